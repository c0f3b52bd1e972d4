"""The committed generated modules match their `.proto` sources.

Compiles every `.proto` under `proto/` to a descriptor set with whatever
grpc_tools is installed (installs nothing) and compares each FileDescriptorProto
with the one embedded in the committed `_pb2.py`. Regenerate with
`python scripts/gen_protos.py` when this fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"

if str(PROTO_ROOT) not in sys.path:
    sys.path.insert(0, str(PROTO_ROOT))


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO_ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_protos = _load_gen_protos()
PROTO_FILES = gen_protos.find_proto_files(PROTO_ROOT)


def _module_name(proto: Path, suffix: str) -> str:
    return ".".join(proto.with_suffix("").parts) + suffix


def _default_json_name(field_name: str) -> str:
    # protoc's rule: drop each underscore and upper-case the letter after it.
    parts = field_name.split("_")
    return parts[0] + "".join(part[:1].upper() + part[1:] for part in parts[1:])


def _strip_default_json_names(messages) -> None:
    # protoc writes json_name for every field into a descriptor set, but the
    # descriptor embedded in a _pb2.py keeps only json_names set in the .proto.
    for message in messages:
        for field in [*message.field, *message.extension]:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
        _strip_default_json_names(message.nested_type)


Descriptors = dict[str, descriptor_pb2.FileDescriptorProto]


def compile_descriptor_set(proto_root: Path, protos: list[Path], tmp_path: Path) -> Descriptors:
    """FileDescriptorProtos of `protos` as the installed protoc compiles them, by file name."""
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools to compile .proto files")
    out = tmp_path / "descriptors.pb"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"--descriptor_set_out={out}",
            *[str(p) for p in protos],
        ],
        cwd=proto_root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for file in descriptor_set.file:
        _strip_default_json_names(file.message_type)
        for field in file.extension:
            if field.json_name == _default_json_name(field.name):
                field.ClearField("json_name")
    return {file.name: file for file in descriptor_set.file}


def committed_descriptor(proto: Path) -> descriptor_pb2.FileDescriptorProto:
    module = importlib.import_module(_module_name(proto, "_pb2"))
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def test_there_are_protos_and_the_public_api_is_one_of_them() -> None:
    assert Path("pdserve/v1/generate.proto") in PROTO_FILES


@pytest.mark.parametrize("proto", PROTO_FILES, ids=str)
def test_committed_module_matches_proto_source(proto: Path, tmp_path: Path) -> None:
    fresh = compile_descriptor_set(PROTO_ROOT, [proto], tmp_path)[proto.as_posix()]
    committed = committed_descriptor(proto)
    assert committed == fresh, f"proto/{proto} changed without regeneration: run python scripts/gen_protos.py"


@pytest.mark.parametrize("proto", PROTO_FILES, ids=str)
def test_all_generated_files_exist_and_come_from_the_pinned_tools(proto: Path) -> None:
    stem = PROTO_ROOT / proto.with_suffix("")
    for suffix in gen_protos.GENERATED_SUFFIXES:
        assert Path(f"{stem}{suffix}").is_file(), f"missing {stem}{suffix}: run python scripts/gen_protos.py"
    grpc_module_text = Path(f"{stem}_pb2_grpc.py").read_text()
    match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_module_text)
    # Files with no service have no version line; those with one must carry the pin,
    # or the stubs may demand a newer grpcio than the GPU machines have.
    if match is not None:
        assert match.group(1) == gen_protos.GRPCIO_TOOLS_VERSION


@pytest.mark.parametrize("proto", PROTO_FILES, ids=str)
def test_grpc_module_defines_every_service_method(proto: Path) -> None:
    grpc_module = importlib.import_module(_module_name(proto, "_pb2_grpc"))
    for service in committed_descriptor(proto).service:
        stub_class = getattr(grpc_module, f"{service.name}Stub")
        servicer_class = getattr(grpc_module, f"{service.name}Servicer")
        assert callable(getattr(grpc_module, f"add_{service.name}Servicer_to_server"))
        for method in service.method:
            assert callable(getattr(servicer_class, method.name)), f"{service.name}.{method.name}"
        # The stub sets one attribute per method on construction.
        with grpc.insecure_channel("127.0.0.1:1") as channel:
            stub = stub_class(channel)
            for method in service.method:
                assert hasattr(stub, method.name)


def test_public_api_shape() -> None:
    from pdserve.v1 import generate_pb2

    service = generate_pb2.DESCRIPTOR.services_by_name["Generation"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Abort", "GetModelInfo"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not methods["Abort"].server_streaming
    request = generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(ids=[1, 2]))
    assert request.WhichOneof("input") == "token_ids"
    # Proto3 optional: an explicit zero temperature (greedy) is distinguishable from unset.
    sampling = generate_pb2.SamplingParams(temperature=0.0)
    assert sampling.HasField("temperature") and not sampling.HasField("top_p")
    assert generate_pb2.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    response = generate_pb2.GenerateResponse.FromString(
        generate_pb2.GenerateResponse(
            request_id="r", complete=generate_pb2.Complete(finish_reason=generate_pb2.FINISH_REASON_LENGTH)
        ).SerializeToString()
    )
    assert response.WhichOneof("event") == "complete"


def test_check_detects_a_proto_edited_without_regeneration(tmp_path: Path) -> None:
    """The comparison above can fail: an added field in a copy of the source is caught."""
    proto = Path("pdserve/v1/generate.proto")
    copy_root = tmp_path / "proto"
    (copy_root / proto.parent).mkdir(parents=True)
    shutil.copyfile(PROTO_ROOT / proto, copy_root / proto)
    source = (copy_root / proto).read_text()
    edited = source.replace("message AbortResponse {", "message AbortResponse {\n  string note = 99;", 1)
    assert edited != source
    (copy_root / proto).write_text(edited)
    fresh = compile_descriptor_set(copy_root, [proto], tmp_path)[proto.as_posix()]
    assert fresh != committed_descriptor(proto)
