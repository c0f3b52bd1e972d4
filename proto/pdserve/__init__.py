"""pdserve: disaggregated prefill/decode LLM serving. The one import root of the project.

    pdserve.engine          the engine both workers run (engine/; engine/core is pure Python)
    pdserve.prefill_worker  the prefill worker (prefill_worker/)
    pdserve.decode_worker   the decode worker (decode_worker/)
    pdserve.transfer        KV transfer: the connector's two sides, nccl and grpc (transfer/)
    pdserve.router          the router: gRPC front door, policies, request streams (router/)
    pdserve.deploy          configs, wiring, Ray actors, `pdserve up` (deploy/)
    pdserve.bench           the load generator behind `pdserve bench`, and benchmarks (bench/)
    pdserve.v1, .internal   generated gRPC stubs (proto/pdserve/)
    pdserve.cli             the `pdserve` command

Installed, each lives in site-packages/pdserve/ (setuptools `package-dir` maps the
repository's top-level folders there). Run from a source checkout with no install (the
GPU machine, `PYTHONPATH=proto`), the subpackages are found at the checkout's top level:
this package's search path then includes it.
"""

import os as _os

_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
if _os.path.isfile(_os.path.join(_CHECKOUT, "pyproject.toml")) and _os.path.isdir(
    _os.path.join(_CHECKOUT, "engine", "core")
):
    __path__.append(_CHECKOUT)  # noqa: F821 - a package's own __path__
