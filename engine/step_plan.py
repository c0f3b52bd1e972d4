"""One engine step's inputs as plain data: what `ModelRunner.plan_step` builds and every
tensor-parallel rank's `ModelRunner.run_step` runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.sampler import PromptLogprobRows, SamplingRow


@dataclass
class StepPlan:
    """One step's inputs as plain (picklable) data, rows in the runner's order: the token
    ids, positions and cache slots of every scheduled token; per sequence its query start,
    query and context lengths and block table; the rows that sample and how; the input
    rows to take from the previous step's sampled tokens (`fill_rows` from its rows
    `fill_src`); the prompt-logprob segments."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[SamplingRow] = field(default_factory=list)
    sample_req_ids: list[str] = field(default_factory=list)
    logits_index: list[int] = field(default_factory=list)
    fill_rows: list[int] = field(default_factory=list)
    fill_src: list[int] = field(default_factory=list)
    prompt_segments: list[PromptLogprobRows] = field(default_factory=list)


@dataclass(frozen=True)
class KVGather:
    """Every rank packs its KV heads of `block_ids` in `layers` (None: every layer) and rank 0
    gathers them (a prefill worker's KV on its way out, piece by piece:
    `TensorParallelRanks.gather_kv`)."""

    block_ids: list[int]
    layers: slice | None = None


@dataclass(frozen=True)
class KVScatter:
    """Rank 0 scatters a whole-heads chunk of layers [layer_start, layer_stop) over the ranks,
    each getting its heads (`shape`, equal on every rank), and every rank writes them into
    `block_ids` (a decode worker's KV arriving: `TensorParallelRanks.scatter_kv`)."""

    block_ids: list[int]
    layer_start: int
    layer_stop: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DeviceWarmUp:
    """Every rank captures its decode CUDA graphs (when it has them) and runs the warm-up steps
    (`ModelRunner.prepare_device`), together: both run the model's collectives. `decode_rows`:
    rank 0's decode-kernel warm-up rows, so every rank runs the same steps."""

    decode_rows: tuple[int, ...]
