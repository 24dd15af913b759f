"""How many CPUs this process may use: its affinity, capped by its container's CPU limit.

``os.cpu_count()`` counts the machine's cores. In a container with a CPU limit (Kubernetes
``resources.limits.cpu``, ``docker run --cpus``) the kernel lets the container run for ``quota``
microseconds per ``period`` (CFS bandwidth control), whatever the number of cores it sees: a pod
limited to 4 CPUs on a 64-core node still sees 64. Sizing by it (front-end processes, PyTorch's
intra-op threads) oversubscribes the limit, and the kernel then throttles the whole container for
the rest of each period. The limit is read where both cgroup versions put it for the container's
own cgroup, as seen from inside it (cgroup namespaces, and the container runtimes' mounts): v2
``cpu.max`` (``"max 100000"`` or ``"400000 100000"``), v1 ``cpu/cpu.cfs_quota_us`` (``-1`` for
none) over ``cpu/cpu.cfs_period_us``. joblib's loky reads the same files for the same reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def quota_cpus(cgroup_root: Path | None = None) -> int | None:
    """The container's CPU limit rounded up to whole CPUs (at least 1), or None without one (or
    where the files are missing or unreadable). ``cgroup_root``: ``CGROUP_ROOT`` if None."""
    cgroup_root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    candidates = (
        (cgroup_root / "cpu.max", None),
        (cgroup_root / "cpu" / "cpu.cfs_quota_us", cgroup_root / "cpu" / "cpu.cfs_period_us"),
        (
            cgroup_root / "cpu,cpuacct" / "cpu.cfs_quota_us",
            cgroup_root / "cpu,cpuacct" / "cpu.cfs_period_us",
        ),
    )
    for quota_file, period_file in candidates:
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields += period_file.read_text().split()
        except OSError:
            continue
        if len(fields) != 2 or fields[0] == "max":
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        if quota <= 0 or period <= 0:  # (v1 writes -1 for no limit)
            return None
        return max(1, math.ceil(quota / period))
    return None


def usable_cpus(cgroup_root: Path | None = None) -> int:
    """The CPUs this process may run on (its affinity), capped by the container's CPU limit."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no affinity outside Linux)
        cpus = os.cpu_count() or 1
    quota = quota_cpus(cgroup_root)
    return max(1, cpus if quota is None else min(cpus, quota))
