"""The committed gRPC stubs are exactly what grpc_tools generates from proto/generate.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
STUBS = ["generate_pb2.py", "generate_pb2_grpc.py", "generate_pb2.pyi"]


def test_stubs_match_the_proto(tmp_path):
    (tmp_path / "proto").mkdir()
    shutil.copy(REPO / "proto" / "generate.proto", tmp_path / "proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", str(tmp_path / "proto" / "generate.proto")])
    assert rc == 0
    for name in STUBS:
        fresh = (tmp_path / "proto" / name).read_text()
        committed = (REPO / "proto" / name).read_text()
        assert fresh == committed, f"proto/{name} is stale: run `make proto`"
