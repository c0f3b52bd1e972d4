"""The in-process deployment the OpenAI HTTP tests share (one per test module) and its SDK client."""

from __future__ import annotations

import openai
import pytest

from pdserve.engine.config import EngineConfig
from tests.inprocess import InProcessDeployment


@pytest.fixture(scope="module")
def dep():
    d = InProcessDeployment(engine=EngineConfig(model="tiny", num_gpu_blocks=512, max_num_seqs=64))
    yield d
    d.close()


@pytest.fixture(scope="module")
def client(dep):
    return openai.OpenAI(base_url=dep.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
