"""The committed stubs in service/pb/ are what protoc makes of proto/pose/v1/pose.proto today.

The stubs are regenerated into a temporary folder with the same command as in
``service/pb/__init__.py`` and compared byte for byte; a difference means someone changed the proto
without regenerating (or edited a generated file by hand).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("pose_pb2.py", "pose_pb2.pyi", "pose_pb2_grpc.py")
REGENERATE = (
    "python -m grpc_tools.protoc -Iservice/pb=proto --python_out=. --pyi_out=. "
    "--grpc_python_out=. proto/pose/v1/pose.proto"
)


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iservice/pb=proto",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "proto/pose/v1/pose.proto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh = (tmp_path / "service/pb/pose/v1" / name).read_bytes()
        committed = (ROOT / "service/pb/pose/v1" / name).read_bytes()
        assert committed == fresh, f"service/pb/pose/v1/{name} is stale: run `{REGENERATE}`"


def test_stubs_import_as_a_package_and_carry_the_contract() -> None:
    from service.pb.pose.v1 import pose_pb2, pose_pb2_grpc

    service = pose_pb2.DESCRIPTOR.services_by_name["PoseService"]
    assert service.full_name == "pose.v1.PoseService"
    assert [m.name for m in service.methods] == ["Estimate", "StreamEstimate", "GetModelInfo"]
    stream = service.methods_by_name["StreamEstimate"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(pose_pb2_grpc, "PoseServiceStub")

    request = pose_pb2.EstimateRequest.DESCRIPTOR.fields_by_name
    assert {"image", "boxes", "frame_id", "flip_test", "return_sigmas"} <= set(request)
    assert request["flip_test"].has_presence  # unset = the server's default
    assert set(pose_pb2.Box.DESCRIPTOR.fields_by_name) == {"x", "y", "width", "height", "score"}
    assert {"frame_id", "persons", "error"} <= set(
        pose_pb2.EstimateResponse.DESCRIPTOR.fields_by_name
    )
    person = set(pose_pb2.Person.DESCRIPTOR.fields_by_name)
    assert {"box", "score", "keypoints", "track_id"} == person
    keypoint = set(pose_pb2.Keypoint.DESCRIPTOR.fields_by_name)
    assert {"x", "y", "score", "sigma_x", "sigma_y"} == keypoint


def test_proto_documents_raw_keypoint_scores() -> None:
    text = (ROOT / "proto/pose/v1/pose.proto").read_text()
    assert "package pose.v1;" in text
    assert "raw" in text and "can fall below 0 or above 1" in text
