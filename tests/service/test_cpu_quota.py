"""The CPUs the service sizes itself by: affinity capped by the container's CPU limit, read from
cgroup files written as the kernel writes them (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from service import cpu_quota, serving
from service.cpu_quota import quota_cpus, usable_cpus
from service.settings import Settings


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
    assert quota_cpus(_write(tmp_path, files)) == cpus


def test_usable_cpus_is_the_affinity_capped_by_the_limit(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity  # no limit
    assert usable_cpus(_write(tmp_path / "a", {"cpu.max": "100000 100000"})) == 1
    assert usable_cpus(_write(tmp_path / "b", {"cpu.max": f"{affinity * 200000} 100000"})) == (
        affinity
    )


def test_front_ends_by_default_count_the_cpus_the_container_may_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a big node
    monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", tmp_path)
    assert Settings(device="cuda").frontend_count() == 4  # no limit: min(4, 64 / 4)
    _write(tmp_path, {"cpu.max": "800000 100000"})
    assert Settings(device="cuda").frontend_count() == 2  # 8 CPUs: 2
    assert Settings(device="cuda", frontends=3).frontend_count() == 3
    assert Settings(device="cpu").frontend_count() == 1


def test_torch_threads_are_capped_at_the_limit_unless_omp_num_threads_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", _write(tmp_path, {"cpu.max": "100000 100000"}))
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        serving.fit_torch_threads()
        assert torch.get_num_threads() == 2  # the operator's choice
        monkeypatch.delenv("OMP_NUM_THREADS")
        serving.fit_torch_threads()
        assert torch.get_num_threads() == 1  # the container's limit
        monkeypatch.setattr(cpu_quota, "CGROUP_ROOT", tmp_path / "none")
        serving.fit_torch_threads()
        assert torch.get_num_threads() == 1  # never raised
    finally:
        torch.set_num_threads(before)
