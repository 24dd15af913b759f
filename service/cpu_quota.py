"""How many CPUs this process may use: its affinity, capped by its cgroups' CPU limits.

``os.cpu_count()`` counts the machine's cores. In a container with a CPU limit (Kubernetes
``resources.limits.cpu``, ``docker run --cpus``) the kernel lets the container run for ``quota``
microseconds per ``period`` (CFS bandwidth control), whatever the number of cores it sees: a pod
limited to 4 CPUs on a 64-core node still sees 64. Sizing by it (front-end processes, PyTorch's
intra-op threads) oversubscribes the limit, and the kernel then throttles the whole container for
the rest of each period.

The limits are read from both cgroup versions' files: v2 ``cpu.max`` (``"max 100000"`` or
``"400000 100000"``), v1 ``cpu.cfs_quota_us`` (``-1`` for none) over ``cpu.cfs_period_us``; in
the process's own cgroup and every one above it (a Kubernetes pod's limit sits on the pod's
cgroup, its container's on the one below), found through ``/proc/self/cgroup``, and at the
mount's root, which is the container's own cgroup where the runtime mounts it so (cgroup
namespaces; Docker's v1 bind mounts, where the path in ``/proc/self/cgroup`` is the host's). The
smallest limit found binds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _own_paths(proc_cgroup: Path) -> tuple[list[str], list[str]]:
    """This process's cgroup paths: (v2, v1 of the ``cpu`` controller)."""
    v2: list[str] = []
    v1: list[str] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2.append(path)
        elif "cpu" in controllers.split(","):
            v1.append(path)
    return v2, v1


def _up_from(base: Path, path: str) -> Iterator[Path]:
    """``base / path`` and each folder above it, down to ``base`` itself."""
    folder = base / path.strip("/")
    if ".." in Path(path).parts:  # (outside the cgroup namespace's root: not ours to read)
        folder = base
    while folder != base and base in folder.parents:
        yield folder
        folder = folder.parent
    yield base


def _limit(quota_file: Path, period_file: Path | None) -> float | None:
    """One cgroup's CPU limit in CPUs, or None (no limit, no file, a file not understood)."""
    try:
        fields = quota_file.read_text().split()
        if period_file is not None:
            fields += period_file.read_text().split()
        quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):  # ("max" is a ValueError: no limit)
        return None
    if len(fields) != 2 or quota <= 0 or period <= 0:  # (v1 writes -1 for no limit)
        return None
    return quota / period


def quota_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int | None:
    """The smallest CPU limit over this process's cgroups, rounded up to whole CPUs (at least 1),
    or None without one. ``cgroup_root``, ``proc_cgroup``: ``CGROUP_ROOT``, ``PROC_CGROUP``
    if None."""
    root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    v2, v1 = _own_paths(PROC_CGROUP if proc_cgroup is None else proc_cgroup)
    limits: list[float | None] = []
    for path in v2 or ["/"]:
        limits += [_limit(folder / "cpu.max", None) for folder in _up_from(root, path)]
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for path in v1 or ["/"]:
            limits += [
                _limit(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")
                for folder in _up_from(base, path)
            ]
    found = [limit for limit in limits if limit is not None]
    return max(1, math.ceil(min(found))) if found else None


def usable_cpus(cgroup_root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """The CPUs this process may run on (its affinity), capped by its cgroups' CPU limits."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no affinity outside Linux)
        cpus = os.cpu_count() or 1
    quota = quota_cpus(cgroup_root, proc_cgroup)
    return max(1, cpus if quota is None else min(cpus, quota))
