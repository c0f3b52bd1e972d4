"""The `pdserve` command: `deploy`'s commands (up, status, down, generate) and `bench`.

It sits above both: `pdserve.deploy` does not import `pdserve.bench` (whose sweep brings
deployments up through it), so the `bench` subcommand is added here.
"""

from __future__ import annotations

import argparse

from pdserve.deploy import cli as deploy_cli


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="load tests against a deployment (vLLM-style)")
    b.add_argument("mode", choices=["serve", "sweep"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=lambda a: _bench(a.mode, a.rest))


def _bench(mode: str, rest: list[str]) -> int:
    if mode == "serve":
        from pdserve.bench.serve import main as serve_main

        return serve_main(rest) or 0
    from pdserve.bench.sweep import main as sweep_main

    return sweep_main(rest) or 0


def main(argv: list[str] | None = None) -> int:
    return deploy_cli.main(argv, extra_commands=_add_bench)


if __name__ == "__main__":
    raise SystemExit(main())
