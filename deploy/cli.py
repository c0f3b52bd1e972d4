"""The `pdserve` command.

    pdserve generate --model tiny --prompt "Hello" --max-tokens 32   # offline engine
    pdserve generate --url 127.0.0.1:50051 --prompt "Hello"          # a running deployment
    pdserve up deploy/local.yaml [--name NAME] [--address ADDR] [--detach] [--demo]
    pdserve status [--name NAME] [--address ADDR]
    pdserve down [--name NAME] [--address ADDR]
    pdserve bench serve|sweep ...                                    # added by pdserve.cli

Errors a user can cause (bad config, bad model path, bad request) print one line
naming what is wrong and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])


def cmd_generate(args: argparse.Namespace) -> int:
    if args.url:
        from pdserve.router.client import GenerateChunk, PdserveClient

        with PdserveClient(args.url) as client:
            client.wait_ready(timeout=args.timeout)
            complete = None
            for ev in client.generate(
                args.prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
            ):
                if isinstance(ev, GenerateChunk):
                    print(ev.text, end="", flush=True)
                else:
                    complete = ev
        print()
        if complete is not None:
            u, t = complete.usage, complete.timings
            print(
                f"[{complete.finish_reason}] prompt {u.prompt_tokens} tokens ({u.cached_tokens} cached), "
                f"{u.completion_tokens} generated; TTFT {t.ttft_ms:.1f} ms, "
                f"KV transfer {t.kv_transfer_ms:.1f} ms",
                file=sys.stderr,
            )
        return 0
    from pdserve.engine import SamplingParams
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.output_processor import OutputProcessor
    from pdserve.engine.tokenizer import load_tokenizer

    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
    mc = engine.model_config
    tokenizer = load_tokenizer(args.model, mc.eos_token_id, mc.bos_token_id)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer.json")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
    )
    ids = tokenizer.encode(args.prompt)
    engine.add_request("cli", ids, params)
    processor = OutputProcessor(tokenizer)
    processor.add("cli", ids, params)
    while engine.has_unfinished():
        for out in engine.step():
            delta = processor.process(out.req_id, out.new_token_ids, out.finished)
            print(delta.text, end="", flush=True)
            if delta.stopped and not out.finished:
                engine.abort_request(out.req_id)
    print()
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from pdserve.deploy import cluster, records
    from pdserve.deploy.config import load_config
    from pdserve.deploy.launcher import up

    overrides = {}
    if args.port is not None:
        overrides["router.port"] = args.port
    if args.http_port is not None:
        overrides["router.http_port"] = None if args.http_port < 0 else args.http_port
    cfg = load_config(args.config, overrides)
    name = records.check_name(args.name or records.default_name(args.config))
    _refuse_if_recorded(name)
    address, head = args.address or cfg.ray.address, None
    if args.detach and address is None:  # a local cluster that outlives this process, on loopback
        cluster.enable_token_auth()
        address, head = cluster.start_head(name, cfg.ray.num_cpus)
    t0 = time.perf_counter()
    try:
        dep = up(cfg, address=address, detached=args.detach, name=name, started_head=head)
    except BaseException:
        if head is not None:
            cluster.stop_head(head)
        raise
    print(
        f"pdserve is serving {dep.config.model} at {dep.url} "
        f"({dep.config.prefill.count}P/{dep.config.decode.count}D/{dep.config.colocated.count} co-located, "
        f"transfer {dep.config.transfer.backend}; up in {time.perf_counter() - t0:.1f} s; "
        f"deployment {name!r})",
        flush=True,
    )
    if dep.http_url:
        print(f"OpenAI-compatible HTTP at {dep.http_url}/v1 (metrics: {dep.http_url}/metrics)", flush=True)
    from pdserve.router.request_limits import RequestLimits

    print(f"router limits: {RequestLimits.from_config(dep.config.router).describe()}", flush=True)
    if args.demo:
        print(f"$ pdserve generate --url {dep.url} --prompt 'Hello, pdserve!'", flush=True)
        demo = argparse.Namespace(
            url=dep.url,
            prompt="Hello, pdserve!",
            max_tokens=32,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            seed=None,
            stop=[],
            timeout=60.0,
        )
        cmd_generate(demo)
    if args.detach:
        print(f"detached: stop it with `pdserve down --name {name}`")
        return 0
    print("serving until Ctrl-C", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    seen, status_failed = 0, False
    try:
        while not stop and (args.serve_seconds is None or time.perf_counter() - t0 < args.serve_seconds):
            time.sleep(0.5)
            try:
                seen = _print_lifecycle_events(dep.status(seen)["events"], seen)
                status_failed = False
            except Exception as exc:  # noqa: BLE001 - keep serving; say it once per outage
                if not status_failed:
                    print(f"router status unavailable: {exc}", flush=True)
                status_failed = True
    except KeyboardInterrupt:
        pass
    dep.down()
    return 0


def _print_lifecycle_events(events: list[dict], seen: int) -> int:
    """Print the router's lifecycle events (worker lost/back, request migrated, ...);
    returns the last seq printed."""
    for event in events:
        stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
        print(f"[{stamp}] {event['message']}", flush=True)
        seen = max(seen, event["seq"])
    return seen


def _refuse_if_recorded(name: str) -> None:
    """One deployment per name on a host: refuse while the recorded one still runs (its `up`
    process or the Ray head it started); a record whose processes are gone is stale."""
    from pdserve.deploy import cluster, records

    if not records.exists(name):
        return
    record = records.load(name)
    owner_alive = record.owner_pid and _pid_alive(record.owner_pid)
    if (
        owner_alive
        or any(cluster.head_running(h) for h in record.started_heads)
        or (record.detached and not record.started_heads)
    ):
        raise ValueError(
            f"deployment {name!r} is already up (router at {record.router_url}): "
            f"`pdserve down --name {name}` first, or pick another --name"
        )
    records.remove(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _connect(args: argparse.Namespace):
    """Join the cluster of deployment `--name` (its record, or `--address`) in its namespace."""
    import ray

    from pdserve.deploy import cluster, records

    name = records.resolve_name(args.name) if args.address is None else records.check_name(args.name or "")
    if args.address is not None:
        namespace = records.namespace_for(name)
        record = records.DeploymentRecord(name=name, namespace=namespace, address=args.address)
    else:
        record = records.load(name)
    cluster.connect(record.address, record.namespace)
    return ray, record


def cmd_status(args: argparse.Namespace) -> int:
    from pdserve.deploy.launcher import ROUTER_NAME

    ray, record = _connect(args)
    try:
        router = ray.get_actor(ROUTER_NAME)
    except ValueError:
        raise ValueError(
            f"deployment {record.name!r} has no router on the Ray cluster at {record.address} "
            f"(stopped? `pdserve down --name {record.name}` clears it)"
        ) from None
    print(f"deployment {record.name!r} (namespace {record.namespace}, Ray at {record.address})")
    status = ray.get(router.status.remote())
    print(
        f"router ready: {status['ready']}; streams: {status['num_streams']}; "
        f"waiting for admission: {status['num_waiting_admission']}"
    )
    for message in status.get("broken_transfer_pairs", {}).values():
        print(message)
    _print_lifecycle_events(status.get("events", [])[-10:], 0)
    stats = status.get("stats", {})
    print("failures: " + ", ".join(f"{k.removeprefix('num_')} {v}" for k, v in stats.items()))
    print(f"{'worker':<14}{'role':<10}{'KV used':>16}{'running':>9}{'waiting':>9}{'restarts':>10}  state")
    for wid, w in status["workers"].items():
        total = w.get("num_total_blocks", 0)
        used = total - w.get("num_free_blocks", 0)
        pct = 100.0 * used / total if total else 0.0
        state = "up" if w.get("alive", True) else f"LOST ({w.get('lost_reason')})"
        print(
            f"{wid:<14}{w['role']:<10}{f'{used}/{total} ({pct:.0f}%)':>16}"
            f"{w.get('num_running', 0):>9}{w.get('num_waiting', 0):>9}{w.get('num_restarts', 0):>10}  {state}"
        )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop deployment `--name`'s actors, and the Ray head its `up --detach` started (by its
    process group; never `ray stop`, never a Ray process it did not start)."""
    from pdserve.deploy import cluster, records

    try:
        ray, record = _connect(args)
    except cluster.ClusterError:
        if args.address is not None:
            raise
        record = records.load(records.resolve_name(args.name))
        if not record.started_heads:
            raise
        ray = None  # the head it started does not answer: stop what is left of it
    killed = 0
    if ray is not None:
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == record.namespace and actor["name"].startswith("pdserve-"):
                ray.kill(ray.get_actor(actor["name"], namespace=record.namespace))
                killed += 1
        ray.shutdown()
    print(f"stopped {killed} pdserve actor(s) of deployment {record.name!r}")
    if record.owner_pid and _pid_alive(record.owner_pid) and b"pdserve" in _cmdline(record.owner_pid):
        os.kill(record.owner_pid, signal.SIGTERM)  # a foreground `pdserve up`: let it exit
        print(f"asked its `pdserve up` (pid {record.owner_pid}) to exit")
    for head in record.started_heads:
        if cluster.stop_head(head):
            print(f"stopped the Ray head it started (pid {head.pid})")
    if args.address is None:
        records.remove(record.name)
    return 0


def build_parser(
    extra_commands: Callable[[argparse._SubParsersAction], None] | None = None,
) -> argparse.ArgumentParser:
    """The parser of deploy's commands; `extra_commands` adds more (pdserve.cli adds bench)."""
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion (offline engine, or --url of a deployment)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local Hugging Face directory, or 'tiny'")
    src.add_argument("--url", help="HOST:PORT of a pdserve router")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--timeout", type=float, default=60.0)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("up", help="start a deployment from a YAML config")
    u.add_argument("config")
    u.add_argument("--address", help="join this Ray cluster (HOST:PORT of its head) instead of starting one")
    u.add_argument("--name", help="the deployment's name (default: the config file's name)")
    u.add_argument("--port", type=int, help="override router.port")
    u.add_argument("--http-port", type=int, help="override router.http_port (0: a free port, -1: off)")
    u.add_argument("--detach", action="store_true", help="leave it running (detached Ray actors)")
    u.add_argument("--demo", action="store_true", help="stream one sample completion once up")
    u.add_argument("--serve-seconds", type=float, default=None, help="stop after this long (default: Ctrl-C)")
    u.set_defaults(func=cmd_up)

    for name, func, help_ in (
        ("status", cmd_status, "show workers and KV usage"),
        ("down", cmd_down, "stop a detached deployment"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--name", help="the deployment (default: the only one recorded on this host)")
        p.add_argument("--address", default=None, help="its Ray cluster, for one `up` on another host")
        p.set_defaults(func=func)

    from pdserve.deploy.top import add_parser as add_top

    add_top(sub)
    if extra_commands is not None:
        extra_commands(sub)
    return parser


def main(
    argv: list[str] | None = None,
    extra_commands: Callable[[argparse._SubParsersAction], None] | None = None,
) -> int:
    args = build_parser(extra_commands).parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # ConfigError is a ValueError: bad config, model path, request
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for errors users hit (e.g. no cluster)
        from pdserve.router.client import PdserveError

        if isinstance(exc, PdserveError):
            print(f"pdserve: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
