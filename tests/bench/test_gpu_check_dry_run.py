"""``bench/gpu_check.sh --dry-run``: every step of the one GPU command runs on the CPU, tiny sizes,
so that the command a session lent a GPU runs (BENCHMARKS.md, "GPU") cannot rot unnoticed.

Nothing here asserts on timing: each step must run and say "ok", the result files must be the
benchmarks' well-formed JSON, and what comes back must fit a device call (at most 8 files).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"
# The steps every GPU check needs; the script's own list (STEPS=(...)) may only add to them.
REQUIRED = {
    "setup",
    "weights",
    "cuda_tests",
    "model",
    "decode",
    "serve_identity",
    "frontends",
    "serve_distilpose_s",
    "model_compile",
}
BENCH_STEPS = {"model": "model", "decode": "decode", "model_compile": "model"}
BENCH_STEPS |= {"serve_identity": "serve", "serve_distilpose_s": "serve", "frontends": "frontend"}
MAX_FILES_BACK = 8  # what a device call brings back from $OUT


def script_steps() -> list[str]:
    match = re.search(r"^STEPS=\(([^)]*)\)", SCRIPT.read_text(), re.M)
    assert match, "bench/gpu_check.sh has no STEPS=(...) line"
    return match.group(1).split()


def run(*args: str, budget_s: int = 280) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DRY_RUN", "ONLY")}
    env.update(PYTHON=sys.executable, BUDGET_S=str(budget_s))
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=budget_s + 60
    )


def summary_rows(out: Path) -> dict[str, dict[str, str]]:
    """The step table of summary.md (its first table): step -> its columns."""
    text = (out / "summary.md").read_text()
    table = text[text.index("| step | status |") :].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 6, line
        columns = ("status", "seconds", "exit", "result", "note")
        rows[cells[0]] = dict(zip(columns, cells[1:], strict=True))
    return rows


# Eight steps, each a fresh interpreter importing torch, and two serving runs that start four server
# processes: 65-105 s on the 2 shared cores of the development machine (load 4-5), so over the 60 s
# default; the script's own budget (280 s here) bounds it.
@pytest.mark.timeout(360)
def test_dry_run_runs_every_step_and_writes_what_comes_back(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run("--dry-run", str(out))
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = summary_rows(out)
    assert list(rows) == script_steps() and set(rows) >= REQUIRED, log
    not_ok = {step: row for step, row in rows.items() if row["status"] != "ok"}
    assert not not_ok, f"{not_ok}\n{(out / 'summary.md').read_text()[-4000:]}"
    assert proc.returncode == 0, log
    assert "skipped" in rows["cuda_tests"]["note"]  # collected, and skipped without CUDA

    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES_BACK and all(p.is_file() for p in out.iterdir()), files
    assert {"summary.md", "logs.tar.gz"} | {f"{s}.json" for s in BENCH_STEPS} == set(files)
    for step, part in BENCH_STEPS.items():
        assert rows[step]["result"] == f"{step}.json"
        doc = json.loads((out / f"{step}.json").read_text())
        assert doc["part"] == part and doc["env"]["device"] == "cpu" and doc["results"], step
        assert f"## {step}" in (out / "summary.md").read_text()  # rendered by bench.report
    for step in ("serve_identity", "serve_distilpose_s"):
        doc = json.loads((out / f"{step}.json").read_text())
        assert doc["args"]["model"] == step.removeprefix("serve_")
        assert all(r["errors"] == 0 for r in doc["results"]), doc["results"]
    identity = json.loads((out / "serve_identity.json").read_text())
    assert all(r["ok"] > 0 for r in identity["results"])  # it answers at once
    # Both front ends' rows come from two load processes (gRPC: two channels each), every one
    # answered, none refused; on the identity model and on DistilPose-S in bf16 (the recipe
    # weights of the weights step).
    frontends = json.loads((out / "frontends.json").read_text())["results"]
    assert {(r["target"], r["model"], r["mode"]) for r in frontends} == {
        (t, model, m)
        for t in ("service-1", "service-2")
        for model in ("identity", "distilpose_s")
        for m in ("http-raw", "grpc-unary")
    }
    assert all(r["load_processes"] == 2 and r["answered"] > 0 for r in frontends), frontends
    assert all(not r["not_ok"] for r in frontends), frontends
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{step}.log" for step in rows} <= names


def test_only_runs_the_steps_named_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "only"
    proc = run("--dry-run", "--only", "weights", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert {step: row["status"] for step, row in summary_rows(out).items()} == {
        "setup": "ok",
        "weights": "ok",
    }
    assert run("--dry-run", "--no-such-flag", str(out)).returncode == 2
    assert run("--dry-run", "--only", "no_such_step", str(out)).returncode == 2
    assert run("--dry-run").returncode == 2  # no output folder and no $OUT
    assert "--dry-run" in run("--help").stdout
