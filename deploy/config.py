"""Deploy configs: one YAML file names the model, cache, worker pools, transfer and router.

Every key is checked: an unknown key or a bad value is a `ConfigError` naming
the key path (e.g. `decode.count`), raised before anything starts.

    model: tiny                      # a local Hugging Face directory, or "tiny"
    engine: {device, dtype, block_size, num_gpu_blocks, max_num_seqs,
             max_num_batched_tokens, max_model_len, enable_prefix_caching,
             host_cache_gb, num_host_blocks, attention_backend, load_format,
             tensor_parallel_size}   # each pool's default
    prefill:   {count, tensor_parallel_size, max_num_batched_tokens, max_num_seqs,
                resources: {num_cpus, num_gpus, resources: {NAME: amount}}}
    decode:    {count, tensor_parallel_size, max_num_batched_tokens, max_num_seqs, resources: ...}
    colocated: {count, tensor_parallel_size, ..., resources: ...}   # workers that run both phases
               # each pool's tensor_parallel_size / max_num_batched_tokens / max_num_seqs: its own,
               # null = engine's (a prefill pool takes whole long prompts per step, decodes none)
    transfer:  {backend: grpc|nccl, host, port_base, data_streams, timeout_s, secret,
                rendezvous_port}
    router:    {host, port, http_port, policy, policy_params: {...}, kv_events, max_queue_len,
                max_wait_s, max_bypasses, default_max_tokens, max_stop_strings,
                max_stop_string_chars, max_stop_token_ids, max_message_bytes,
                max_concurrent_rpcs, max_pending_rpcs, worker_timeout_s,
                max_migrations}   # see RouterConfig
    ray:       {address, namespace, num_cpus, resource_wait_s, max_worker_restarts}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.router.request_limits import RequestLimits
from pdserve.transfer.config import TransferConfig
from pdserve.transfer.layout import check_tp_pair

TP_ENGINE_KEY = "engine.tensor_parallel_size"


class ConfigError(ValueError):
    pass


@dataclass
class PoolConfig:
    count: int = 0
    resources: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 0})
    # Ranks each worker of this pool spreads the model over; null: engine.tensor_parallel_size.
    tensor_parallel_size: int | None = None
    # This pool's scheduling budgets; null: the engine's. A prefill pool decodes nothing, so a
    # step as long as a whole long prompt costs no one's inter-token latency (as Dynamo's
    # prefill and decode workers take engine arguments of their own).
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None

    def engine_for(self, engine: EngineConfig) -> EngineConfig:
        """The engine config this pool's workers run: `engine` with the pool's own settings."""
        overrides = {key: getattr(self, key) for key in POOL_ENGINE_KEYS if getattr(self, key) is not None}
        return dataclasses.replace(engine, **overrides) if overrides else engine


POOL_BUDGET_KEYS = ("max_num_batched_tokens", "max_num_seqs")  # each >= 1 when set
POOL_ENGINE_KEYS = ("tensor_parallel_size", *POOL_BUDGET_KEYS)  # a pool's own engine settings


@dataclass
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    # OpenAI-compatible HTTP (router/http_server.py) on the same host: 0 picks a free port,
    # null (the default) serves none.
    http_port: int | None = None
    policy: str = "cache_aware"
    policy_params: dict[str, float] = field(default_factory=dict)
    kv_events: bool = True
    # Admission: requests that fit but find no room wait, at most max_queue_len of them,
    # each at most max_wait_s (then RESOURCE_EXHAUSTED). Later requests that fit may pass
    # one that does not yet, but at most max_bypasses times (0: strict FIFO).
    max_queue_len: int = 256
    max_wait_s: float = 30.0
    max_bypasses: int = 16
    default_max_tokens: int = 16  # for a request without max_tokens, cut to what its context leaves
    # Request bounds (INVALID_ARGUMENT past them) and gRPC server limits: router/request_limits.py.
    max_stop_strings: int = RequestLimits.max_stop_strings
    max_stop_string_chars: int = RequestLimits.max_stop_string_chars
    max_stop_token_ids: int = RequestLimits.max_stop_token_ids
    max_message_bytes: int = RequestLimits.max_message_bytes
    max_concurrent_rpcs: int = RequestLimits.max_concurrent_rpcs
    max_pending_rpcs: int = RequestLimits.max_pending_rpcs
    # A worker whose poll brings no answer this long past the poll's own wait is lost
    # (a dead actor is lost at once), and its requests move to other workers.
    worker_timeout_s: float = 5.0
    # New attempts a request may take after losing a worker; past it: UNAVAILABLE.
    max_migrations: int = 3


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" or "host:port": join
    namespace: str | None = None  # None: `pdserve-<deployment name>` (deploy/records.py)
    num_cpus: int | None = None
    resource_wait_s: float = 30.0  # how long `up` waits for nodes offering the pools' resources
    # Ray restarts a crashed worker actor this many times (-1: always); it rejoins routing
    # with a fresh instance id. With transfer.backend nccl workers are not restarted: a new
    # process cannot join the running torch.distributed group (see deploy/launcher.py).
    max_worker_restarts: int = 3


@dataclass
class DeployConfig:
    model: str = "tiny"
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill: PoolConfig = field(default_factory=PoolConfig)
    decode: PoolConfig = field(default_factory=PoolConfig)
    colocated: PoolConfig = field(default_factory=PoolConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def disaggregated(self) -> bool:
        return self.prefill.count > 0


_RESOURCE_KEYS = {"num_cpus", "num_gpus", "resources", "memory"}


def _build(cls, data: Any, path: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{key_path}: unknown key (allowed: {', '.join(sorted(fields))})")
        f = fields[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, key_path)
        else:
            kwargs[key] = _check_type(value, f.type, default, key_path)
    return cls(**kwargs)


def _check_type(value: Any, type_str: Any, default: Any, path: str) -> Any:
    t = str(type_str)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{path}: must not be null")
    if t.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if t.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if t.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _check_tensor_parallel(cfg: DeployConfig) -> None:
    """Each pool's tensor_parallel_size (its own, else engine's) must suit the engine config and,
    when the model's config is at hand here (`tiny`, or a local directory), split its heads;
    a prefill and a decode size must split the KV heads both (named together). On CUDA a
    worker's ranks take one GPU each of its actor's: `num_gpus` defaults to the size."""
    pools = [(name, getattr(cfg, name)) for name in ("prefill", "decode", "colocated")]
    for name, pool in pools:
        if not pool.count:
            continue
        size = pool.engine_for(cfg.engine).tensor_parallel_size
        key = f"{name}.tensor_parallel_size" if pool.tensor_parallel_size is not None else TP_ENGINE_KEY
        try:
            pool.engine_for(cfg.engine).validate()
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if not cfg.engine.device.startswith("cuda") or size == 1:
            continue
        if cfg.engine.tensor_parallel_shared_device:
            if cfg.transfer.backend == "nccl":  # its ranks would join the transfer group on one GPU
                raise ConfigError(
                    f"engine.tensor_parallel_shared_device with transfer.backend nccl and {key} {size}: "
                    "NCCL cannot place several ranks of one group on one GPU; use transfer.backend grpc"
                )
            continue  # every rank on the actor's one GPU (testing): num_gpus as configured
        gpus = pool.resources.get("num_gpus")
        if gpus is None:
            pool.resources["num_gpus"] = size  # the actor holds its ranks' GPUs
        elif gpus < size:
            raise ConfigError(
                f"{name}.resources.num_gpus: {gpus} is fewer than {key} {size} (one GPU per rank)"
            )
    sizes = {name: pool.engine_for(cfg.engine).tensor_parallel_size for name, pool in pools if pool.count}
    model = _local_model_config(cfg.model) if set(sizes.values()) != {1} else None
    if model is None:
        return  # a directory only the workers' nodes have: each worker checks its own size
    from pdserve.engine.model.sharding import check_shardable  # (torch: only for TP configs)

    pair = ""
    if "prefill" in sizes and "decode" in sizes:
        try:
            check_tp_pair(model.num_key_value_heads, sizes["prefill"], sizes["decode"])
        except ValueError as exc:
            raise ConfigError(f"decode.{exc}") from None
        pair = f" (prefill {sizes['prefill']}, decode {sizes['decode']})"
    for name, size in sizes.items():
        try:
            check_shardable(model, size)
        except ValueError as exc:
            raise ConfigError(f"{name}.tensor_parallel_size{pair}: {exc}") from None


def _local_model_config(model: str) -> ModelConfig | None:
    """The model's config when it can be read here (`tiny`, or a directory with config.json)."""
    if model != "tiny" and not os.path.isfile(os.path.join(model, "config.json")):
        return None
    try:
        return ModelConfig.resolve(model)
    except (OSError, ValueError):
        return None


def parse_config(data: dict[str, Any]) -> DeployConfig:
    engine_data = dict((data or {}).get("engine") or {})
    for key in ("model", "role"):
        if key in engine_data:
            raise ConfigError(
                f"engine.{key}: unknown key (set the model at the top level; roles come from pools)"
            )
    cfg = _build(DeployConfig, data, "")
    cfg.engine.model = cfg.model
    try:
        cfg.engine.validate()
    except ValueError as exc:
        raise ConfigError(f"engine: {exc}") from exc
    for name in ("prefill", "decode", "colocated"):
        pool: PoolConfig = getattr(cfg, name)
        if pool.count < 0:
            raise ConfigError(f"{name}.count: must be >= 0, got {pool.count}")
        for key in POOL_BUDGET_KEYS:
            if (value := getattr(pool, key)) is not None and value < 1:
                raise ConfigError(f"{name}.{key}: must be >= 1 (or null: engine.{key}), got {value}")
        for key in pool.resources:
            if key not in _RESOURCE_KEYS:
                raise ConfigError(
                    f"{name}.resources.{key}: unknown key (allowed: {', '.join(sorted(_RESOURCE_KEYS))})"
                )
    _check_tensor_parallel(cfg)
    if (cfg.prefill.count > 0) != (cfg.decode.count > 0):
        raise ConfigError("prefill.count / decode.count: a disaggregated deployment needs both pools")
    if cfg.prefill.count and cfg.colocated.count:
        raise ConfigError(
            "colocated.count: a deployment runs either co-located workers or prefill and decode pools, "
            "not both (the router would pick a co-located worker as another request's prefill side)"
        )
    if cfg.prefill.count + cfg.decode.count + cfg.colocated.count == 0:
        raise ConfigError("prefill.count / decode.count / colocated.count: no workers configured")
    try:
        cfg.transfer.validate()
    except ValueError as exc:
        raise ConfigError(str(exc).replace("TransferConfig.", "transfer.")) from None
    last_port = cfg.transfer.port_base + 2 * cfg.decode.count - 1
    if cfg.transfer.port_base and not (1024 <= cfg.transfer.port_base and last_port <= 65535):
        raise ConfigError(
            f"transfer.port_base: {cfg.transfer.port_base} .. {last_port} (two ports per decode worker) "
            "must lie in [1024, 65535], or 0 for free ports"
        )
    if cfg.ray.resource_wait_s < 0:
        raise ConfigError(f"ray.resource_wait_s: must be >= 0, got {cfg.ray.resource_wait_s}")
    from pdserve.router.policy import POLICIES, PolicyConfig

    if cfg.router.policy not in POLICIES:
        raise ConfigError(f"router.policy: must be one of {', '.join(POLICIES)}, got {cfg.router.policy!r}")
    policy_fields = {f.name for f in dataclasses.fields(PolicyConfig)}
    for key in cfg.router.policy_params:
        if key not in policy_fields:
            raise ConfigError(
                f"router.policy_params.{key}: unknown key (allowed: {', '.join(sorted(policy_fields))})"
            )
    if not cfg.router.worker_timeout_s > 0:
        raise ConfigError(f"router.worker_timeout_s: must be > 0, got {cfg.router.worker_timeout_s}")
    if cfg.router.max_migrations < 0:
        raise ConfigError(f"router.max_migrations: must be >= 0, got {cfg.router.max_migrations}")
    if cfg.ray.max_worker_restarts < -1:
        raise ConfigError(f"ray.max_worker_restarts: must be >= -1, got {cfg.ray.max_worker_restarts}")
    if not 0 <= cfg.router.port < 65536:
        raise ConfigError(f"router.port: must be in [0, 65535], got {cfg.router.port}")
    http_port = cfg.router.http_port
    if http_port is not None and not 0 <= http_port < 65536:
        raise ConfigError(f"router.http_port: must be in [0, 65535] or null (off), got {http_port}")
    if http_port and http_port == cfg.router.port:
        raise ConfigError(f"router.http_port: {http_port} is router.port already")
    _check_router_bounds(cfg.router)
    return cfg


def _check_router_bounds(router: RouterConfig) -> None:
    minimums = {
        "max_queue_len": 0,
        "max_wait_s": 0,
        "max_bypasses": 0,
        "default_max_tokens": 1,
        "max_stop_strings": 0,
        "max_stop_string_chars": 1,
        "max_stop_token_ids": 0,
        "max_message_bytes": 1024,
        "max_concurrent_rpcs": 1,
        "max_pending_rpcs": 1,
    }
    for key, minimum in minimums.items():
        value = getattr(router, key)
        if value < minimum:
            raise ConfigError(f"router.{key}: must be >= {minimum}, got {value}")
    if router.max_message_bytes >= 1 << 31:
        raise ConfigError(
            f"router.max_message_bytes: must be < 2 GiB (gRPC's limit), got {router.max_message_bytes}"
        )


def load_config(path: str, overrides: dict[str, Any] | None = None) -> DeployConfig:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, str) and model != "tiny" and not os.path.isabs(model):
        # Workers run elsewhere (other cwd, other nodes): make a relative model path absolute,
        # relative to the current directory, else to the config file's folder.
        for base in (os.getcwd(), os.path.dirname(os.path.abspath(path))):
            if os.path.isdir(os.path.join(base, model)):
                data["model"] = os.path.abspath(os.path.join(base, model))
                break
    return parse_config(data)
