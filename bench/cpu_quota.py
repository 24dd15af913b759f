"""The served CPU pipeline under a container CPU limit, with PyTorch's default threads against the
threads the service now sets (``service.serving.fit_torch_threads``: no more than the limit).

Each case runs in a child process placed in a fresh cgroup of the machine's v1 ``cpu`` hierarchy
whose CFS quota is ``--quota-cpus`` CPUs (what ``docker run --cpus`` and a Kubernetes CPU limit
set). The child builds the pipeline ``pose-service serve`` builds on a CPU by default
(``blazepose_full`` from the reference cache, backend ``auto``: OpenVINO, whose threads follow
PyTorch's) and runs ``--images`` images of COCO 785 with its person box per call, for
``--seconds``. Recorded: images/s, the calls' median and p90 wall time, the threads, and the
kernel's ``nr_throttled`` / ``throttled_time`` over the run (from the cgroup's ``cpu.stat``).
Cases alternate, ``--rounds`` times. Needs root and a v1 ``cpu`` hierarchy (this machine's).

    python -m bench.cpu_quota
    python -m bench.cpu_quota --quota-cpus 1 --seconds 20 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    ASSET_PERSON_BOXES,
    ASSETS_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    environment,
    write_result,
)

CASES = ("torch-default", "fitted")
ASSET = "coco_000000000785.jpg"


def cpu_hierarchy() -> Path | None:
    """The machine's cgroup v1 ``cpu`` hierarchy if this process may make cgroups in it (root),
    else None."""
    for base in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (base / "cpu.cfs_quota_us").exists() and os.access(base, os.W_OK):
            return base
    return None


@contextlib.contextmanager
def limited_cgroup(cpus: float, prefix: str) -> Iterator[Path]:
    """A fresh cgroup of ``cpu_hierarchy()`` whose CFS quota is ``cpus`` CPUs (as ``docker run
    --cpus`` sets it); removed at exit, once the kernel has emptied it (its processes reaped).

    Raises:
        RuntimeError: No writable hierarchy.
    """
    base = cpu_hierarchy()
    if base is None:
        raise RuntimeError("needs a writable cgroup v1 cpu hierarchy (root)")
    group = base / f"{prefix}-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        period = 100_000
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(int(cpus * period)))
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def in_cgroup(group: Path, command: list[str]) -> list[str]:
    """``command``, run so that it starts inside ``group`` (the shell joins it, then execs)."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]


def environ_without_thread_settings() -> dict[str, str]:
    """This environment less ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (which would decide
    PyTorch's threads instead of the cgroup's limit)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _cpu_stat(group: Path) -> dict[str, int]:
    return {
        key: int(value)
        for key, value in (line.split() for line in (group / "cpu.stat").read_text().splitlines())
    }


def child(case: str, model: str, images: int, seconds: float) -> dict[str, Any]:
    """One case, in this (cgroup-limited) process."""
    import torch

    from model.interfaces import PipelineItem
    from model.pipeline import build_pipeline
    from service import serving
    from service.uploads import decode_image

    default_threads = torch.get_num_threads()
    if case == "fitted":
        serving.fit_torch_threads()
    pipeline = build_pipeline(
        model=model, weights=None, detector=None, detector_weights=None, backend="auto"
    )
    pipeline.warmup()
    image = decode_image((ASSETS_DIR / ASSET).read_bytes(), max_pixels=40_000_000)
    box = torch.tensor([ASSET_PERSON_BOXES[ASSET]], dtype=torch.float32)
    batch = [PipelineItem(image, box) for _ in range(images)]
    for _ in range(3):
        pipeline.run(batch)
    walls = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        pipeline.run(batch)
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return {
        "threads": torch.get_num_threads(),
        "default_threads": default_threads,
        "backend": pipeline.describe().backend,
        "calls": len(walls),
        "images_per_s": images * len(walls) / sum(walls),
        "call_ms_p50": 1000 * walls[len(walls) // 2],
        "call_ms_p90": 1000 * walls[int(len(walls) * 0.9)],
    }


def measure(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in a fresh cgroup limited to ``args.quota_cpus``."""
    with limited_cgroup(args.quota_cpus, "bench-cpu-quota") as group:
        env = environ_without_thread_settings()
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        command = [
            sys.executable, "-m", "bench.cpu_quota", "--child", case, "--model", args.model,
            "--images", str(args.images), "--seconds", str(args.seconds),
        ]  # fmt: skip
        before = _cpu_stat(group)
        out = subprocess.run(
            in_cgroup(group, command),
            env=env,
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        after = _cpu_stat(group)
    row = json.loads(out.strip().splitlines()[-1])
    row.update(
        case=case,
        quota_cpus=args.quota_cpus,
        nr_throttled=after["nr_throttled"] - before["nr_throttled"],
        throttled_s=(after["throttled_time"] - before["throttled_time"]) / 1e9,
    )
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_quota", description=__doc__)
    parser.add_argument("--quota-cpus", type=float, default=1.0)
    parser.add_argument("--model", default="blazepose_full")
    parser.add_argument("--images", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--seconds", type=float, default=15.0, help="per case and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and cpu_hierarchy() is None:
        raise SystemExit("needs a writable cgroup v1 cpu hierarchy (root)")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.images, args.seconds)))
        return 0
    env = environment("cpu")
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    for _ in range(args.rounds):
        for case in CASES:
            runs[case].append(measure(case, args))
    rows = [
        {
            **runs[case][0],
            "rounds": len(runs[case]),
            "images_per_s": [r["images_per_s"] for r in runs[case]],
            "images_per_s_median": statistics.median(r["images_per_s"] for r in runs[case]),
            "call_ms_p50": [r["call_ms_p50"] for r in runs[case]],
            "call_ms_p90": [r["call_ms_p90"] for r in runs[case]],
            "throttled_s": [r["throttled_s"] for r in runs[case]],
            "nr_throttled": [r["nr_throttled"] for r in runs[case]],
        }
        for case in CASES
    ]
    path = write_result("cpu_quota", "cpu", args, rows, out_dir=args.out_dir, env=env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
