"""The CPUs the service sizes itself by: affinity capped by its cgroups' CPU limits. Unit tests
read cgroup files written as the kernel writes them (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``, ``/proc/self/cgroup``); one test puts a real ``pose-service serve`` into a
real cgroup with a CPU limit, where this machine lets it (root, a writable v1 ``cpu`` hierarchy)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cpu_quota import (
    cpu_hierarchy,
    environ_without_thread_settings,
    in_cgroup,
    limited_cgroup,
)
from service import cpu_quota, serving
from service.cpu_quota import quota_cpus, usable_cpus
from service.settings import Settings

# /proc/self/cgroup of a process at each hierarchy's root (inside a cgroup namespace).
AT_ROOT = "0::/\n"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "400000 100000\n"}, 4),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads may run, throttled
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "800000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            8,
        ),
        ({"cpu/cpu.cfs_quota_us": "200000\n"}, None),  # (no period file: no answer)
        ({"cpu.max": "many 100000\n"}, None),
        ({"cpu.max": "\n"}, None),
        ({}, None),
    ],
)
def test_the_container_cpu_limit_is_read_from_either_cgroup_version(
    tmp_path: Path, files: dict[str, str], cpus: int | None
) -> None:
    proc = _write(tmp_path / "proc", {"cgroup": AT_ROOT}) / "cgroup"
    assert quota_cpus(_write(tmp_path / "fs", files), proc) == cpus


@pytest.mark.parametrize(
    ("proc_cgroup", "files", "cpus"),
    [
        # v2, a Kubernetes pod without a cgroup namespace: the pod's limit is above the
        # container's cgroup, and the smaller of the two binds.
        (
            "0::/kubepods/pod1/ctr\n",
            {"kubepods/pod1/cpu.max": "400000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000"},
            4,
        ),
        (
            "0::/kubepods/pod1/ctr\n",
            {
                "kubepods/pod1/cpu.max": "800000 100000",
                "kubepods/pod1/ctr/cpu.max": "300000 100000",
            },
            3,
        ),
        # v1, a process in a child cgroup of the cpu hierarchy (as the test below makes).
        (
            "4:memory:/x\n1:cpu:/jobs/one\n0::/\n",
            {"cpu/jobs/one/cpu.cfs_quota_us": "100000", "cpu/jobs/one/cpu.cfs_period_us": "100000"},
            1,
        ),
        (
            "2:cpu,cpuacct:/jobs/one\n",
            {
                "cpu,cpuacct/jobs/cpu.cfs_quota_us": "200000",
                "cpu,cpuacct/jobs/cpu.cfs_period_us": "50000",
            },
            4,
        ),
        # v1 Docker without a cgroup namespace: the path is the host's, the mount's root is the
        # container's own cgroup.
        (
            "1:cpu,cpuacct:/docker/0123abcd\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "200000", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            2,
        ),
        # Outside the namespace's root: nothing above the mount is read.
        ("0::/../../elsewhere\n", {"cpu.max": "max 100000"}, None),
    ],
)
def test_every_cgroup_from_the_process_own_up_to_the_root_is_read(
    tmp_path: Path, proc_cgroup: str, files: dict[str, str], cpus: int | None
) -> None:
    proc = _write(tmp_path / "proc", {"cgroup": proc_cgroup}) / "cgroup"
    assert quota_cpus(_write(tmp_path / "fs", files), proc) == cpus


def test_usable_cpus_is_the_affinity_capped_by_the_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    proc = _write(tmp_path / "proc", {"cgroup": AT_ROOT}) / "cgroup"
    assert usable_cpus(tmp_path / "none", proc) == affinity  # no limit
    assert usable_cpus(_write(tmp_path / "a", {"cpu.max": "100000 100000"}), proc) == 1
    double = {"cpu.max": f"{affinity * 200000} 100000"}
    assert usable_cpus(_write(tmp_path / "b", double), proc) == affinity


def _limit_to(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str | None) -> None:
    """Serve as if on a 64-core node with ``cpu_max`` (None: no limit) in this cgroup."""
    files = {"cgroup/cpu.max": cpu_max} if cpu_max is not None else {}
    _write(tmp_path, {"proc/cgroup": AT_ROOT, **files})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", tmp_path / "cgroup")
    monkeypatch.setattr(cpu_quota, "PROC_CGROUP", tmp_path / "proc" / "cgroup")


def test_front_ends_by_default_count_the_cpus_the_container_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _limit_to(monkeypatch, tmp_path / "a", None)
    assert Settings(device="cuda").frontend_count() == 4  # no limit: min(4, 64 / 4)
    _limit_to(monkeypatch, tmp_path / "b", "800000 100000")
    assert Settings(device="cuda").frontend_count() == 2  # 8 CPUs: 2
    assert Settings(device="cuda", frontends=3).frontend_count() == 3
    assert Settings(device="cpu").frontend_count() == 1


def test_torch_threads_are_capped_at_the_limit_unless_omp_num_threads_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    _limit_to(monkeypatch, tmp_path / "a", "100000 100000")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        serving.fit_torch_threads()
        assert torch.get_num_threads() == 2  # the operator's choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        serving.fit_torch_threads()
        assert torch.get_num_threads() == 1  # the container's limit
        _limit_to(monkeypatch, tmp_path / "b", None)
        serving.fit_torch_threads()
        assert torch.get_num_threads() == 1  # never raised
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(
    cpu_hierarchy() is None or len(os.sched_getaffinity(0)) < 2,
    reason="needs a writable cgroup v1 cpu hierarchy (root) and 2 CPUs",
)
def test_a_real_cgroup_limit_caps_the_served_model_threads(tmp_path: Path) -> None:
    """`pose-service serve` in a cgroup limited to 1 CPU (by the kernel's CFS quota) runs its
    model on 1 PyTorch thread, and says so; on this machine PyTorch would start one per core."""
    serve = [
        sys.executable, "-m", "service", "serve", "--model", "identity", "--device", "cpu",
        "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--log-level", "info",
    ]  # fmt: skip
    with limited_cgroup(1.0, "pose-test") as group:
        process = subprocess.Popen(
            in_cgroup(group, serve),
            env=environ_without_thread_settings(),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stderr is not None
            lines: list[str] = []
            for line in process.stderr:  # (the threads are set before the model loads)
                lines.append(line)
                if '"msg":"ready"' in line:
                    break
            said = [line for line in lines if "PyTorch threads" in line]
            assert said, "".join(lines[-20:])
            assert "PyTorch threads: 1," in said[0]
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
