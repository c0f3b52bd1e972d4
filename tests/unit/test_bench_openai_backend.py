"""`pdserve bench serve --backend openai` against pdserve's own HTTP API, next to the gRPC backend."""

from __future__ import annotations

import json

from pdserve.bench.serve import main as serve_main
from tests.inprocess import InProcessDeployment

WORKLOAD = ["--num-prompts", "8", "--random-input-len", "24", "--random-output-len", "8", "--disable-tqdm"]


def test_openai_backend_matches_grpc_backend(tmp_path, capsys):
    dep = InProcessDeployment()
    try:
        common = [*WORKLOAD, "--save-result", "--result-dir", str(tmp_path)]
        assert serve_main(["--url", dep.url, *common, "--result-filename", "grpc.json"]) == 0
        openai_args = ["--backend", "openai", "--url", dep.http_url + "/v1", "--vocab-size", "258"]
        assert serve_main([*openai_args, *common, "--result-filename", "openai.json"]) == 0
        grpc = json.loads((tmp_path / "grpc.json").read_text())
        http = json.loads((tmp_path / "openai.json").read_text())
        assert http["backend"] == "openai" and grpc["backend"] == "pdserve-grpc"
        for result in (grpc, http):
            assert result["completed"] == 8 and result["failed"] == 0
            assert result["total_output_tokens"] == 8 * 8
        assert http["total_input_tokens"] == grpc["total_input_tokens"]
        assert http["model_id"] == "tiny"
        # no --vocab-size: one clear error, no traceback
        assert serve_main(["--backend", "openai", "--url", dep.http_url, *WORKLOAD]) == 1
        assert "--vocab-size" in capsys.readouterr().err
    finally:
        dep.close()
