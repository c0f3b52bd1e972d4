"""GPU tests: every test here is marked `gpu` and skipped cleanly without CUDA or Triton.

With TRITON_INTERPRET=1 on a CPU-only machine the Triton tests run on CPU tensors through
Triton's interpreter (slow, small shapes), which is how the kernels are developed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into an index with int(1-element array),
    which numpy >= 2.3 refuses; `range(start_tensor, ...)` in a kernel then fails on CPU."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch


if _interpreting() and importlib.util.find_spec("triton") is not None:
    _fix_interpreter_scalar_index()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    has_triton = importlib.util.find_spec("triton") is not None
    skip_reason = None
    if not has_triton:
        skip_reason = "triton is not installed"
    elif not torch.cuda.is_available() and not _interpreting():
        skip_reason = "needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU interpreter)"
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.gpu)
        if skip_reason:
            item.add_marker(pytest.mark.skip(reason=skip_reason))


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
