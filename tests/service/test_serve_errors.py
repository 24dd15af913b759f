"""``pose-service`` where a newcomer trips: a misspelt flag gets a "did you mean" (as a misspelt
``POSE_*`` variable does), and a port that cannot be bound is said in JSON like every other line of
the log (gRPC's C core would write a plain-text line of its own), with a non-zero exit status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import service.__main__ as cli

POSE_SERVICE = Path(sys.executable).parent / "pose-service"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["serve", "--max-batch", "3"], "--max-batch (did you mean --max-batch-size?) 3"),
        (["serve", "--http-prot=9000"], "--http-prot=9000 (did you mean --http-port?)"),
        (
            ["serve", "--no-flip", "--devise", "cpu"],
            "--no-flip (did you mean --no-flip-test?) --devise (did you mean --device?) cpu",
        ),
        (["models", "fetch", "--forse"], "--forse (did you mean --force?)"),
        (["serve", "--zzzzzz"], "--zzzzzz"),  # nothing close: named alone
    ],
)
def test_an_unknown_flag_gets_a_did_you_mean(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    command = "serve" if argv[0] == "serve" else "models fetch"
    # The error comes from the command's own parser, whose usage lists the flags it has.
    assert f"usage: pose-service {command} " in err
    assert err.rstrip().endswith(f"pose-service {command}: error: unrecognized arguments: {said}")


def test_known_flags_still_parse() -> None:
    args = cli.parse_args(cli.build_parser(), ["serve", "--max-batch-size", "3", "--no-flip-test"])
    assert args.max_batch_size == 3 and args.flip_test is False


def _serve_on_a_busy_port(busy: str) -> tuple[int, int, list[dict[str, Any]]]:
    """Run ``pose-service serve`` with the ``busy`` ("grpc" or "http") port held by a socket.

    Returns:
        The held port, the exit status, and every stderr line parsed as JSON.
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ports = {"grpc": "0", "http": "0", busy: str(port)}
        argv = [
            str(POSE_SERVICE),
            "serve",
            "--host=127.0.0.1",
            f"--grpc-port={ports['grpc']}",
            f"--http-port={ports['http']}",
            # No model file needed: the servers bind before any model is built.
            "--model=distilpose_s",
            "--allow-random-weights",
            "--detector=none",
            "--no-warmup",
        ]
        # As an operator starts it: no POSE_* settings of ours, no GRPC_* of the caller's.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POSE_", "GRPC_"))}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=50)
    lines = done.stderr.splitlines()
    assert lines, "nothing logged"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a stderr line is not JSON: {line!r}\n--- stderr:\n{done.stderr}")
    return port, done.returncode, records


@pytest.mark.parametrize("busy", ["grpc", "http"])
def test_a_port_in_use_is_logged_as_json_and_exits_1(busy: str) -> None:
    port, status, records = _serve_on_a_busy_port(busy)
    assert status == 1, records
    failed = [r for r in records if r["level"] == "error" and "failed to start" in r["msg"]]
    assert len(failed) == 1, records
    transport = {"grpc": "gRPC", "http": "HTTP"}[busy]
    assert failed[0]["msg"].startswith(f"the {transport} server failed to start")
    assert failed[0]["msg"].endswith(f"127.0.0.1:{port}: Address already in use")
    assert records[-1] is failed[0], "the service stopped once it could not bind"
