"""Offline throughput of the engine against transformers' `generate`, same prompts, same run.

    python -m pdserve.bench.engine [--model tiny] [--num-prompts 32] [--input-len 64] [--output-len 32]

Prints output tokens/s for `LLM.generate` (all prompts at once: continuous batching
over the paged cache) and for transformers' `generate` on the same model (one prompt
at a time, greedy, KV cache on), and their ratio. For the `tiny` preset the
transformers model is built from the same weights (the engine's state dict loads
into `LlamaForCausalLM` unchanged).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from pdserve.engine import LLM, SamplingParams


def hf_model_from_engine(llm: LLM):
    import transformers as tf

    mc = llm.engine.model_config
    cfg = tf.LlamaConfig(
        vocab_size=mc.vocab_size,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads,
        head_dim=mc.head_dim,
        max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.rms_norm_eps,
        rope_theta=mc.rope_theta,
        tie_word_embeddings=mc.tie_word_embeddings,
    )
    model = tf.LlamaForCausalLM(cfg).eval()
    from pdserve.engine.model.loader import checkpoint_tensors

    model.load_state_dict(checkpoint_tensors(llm.engine.runner.model), strict=False)
    return model.to(llm.engine.runner.device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rng = random.Random(0)
    llm = LLM(args.model, device=args.device, num_gpu_blocks=4096)
    vocab = llm.engine.model_config.vocab_size
    prompts = [
        [rng.randrange(min(vocab, 256)) for _ in range(args.input_len)] for _ in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], params)  # warm-up
    llm.engine.kv_manager.pool.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    engine_s = time.perf_counter() - t0
    engine_tokens = sum(len(o.token_ids) for o in outs)

    hf = hf_model_from_engine(llm)
    t0 = time.perf_counter()
    hf_tokens = 0
    matches = 0
    with torch.no_grad():
        for prompt, out in zip(prompts, outs, strict=True):
            ids = torch.tensor([prompt], device=llm.engine.runner.device)
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                pad_token_id=0,
            )
            new = gen[0, len(prompt) :].tolist()
            hf_tokens += len(new)
            matches += new == out.token_ids
    hf_s = time.perf_counter() - t0
    row = {
        "model": args.model,
        "device": args.device,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "engine_tokens_per_s": engine_tokens / engine_s,
        "transformers_tokens_per_s": hf_tokens / hf_s,
        "ratio": (engine_tokens / engine_s) / (hf_tokens / hf_s),
        "greedy_outputs_equal": f"{matches}/{len(prompts)}",
    }
    print(f"{'':<14}{'tokens/s':>10}")
    print(f"{'pdserve':<14}{row['engine_tokens_per_s']:>10.1f}")
    print(f"{'transformers':<14}{row['transformers_tokens_per_s']:>10.1f}")
    print(
        f"ratio pdserve / transformers: {row['ratio']:.2f}  "
        f"(same greedy tokens: {row['greedy_outputs_equal']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
