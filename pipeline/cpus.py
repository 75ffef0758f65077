"""Which CPUs the data plane's processes get: distinct physical cores before hyperthreads.

Workers are pinned round robin over ``dataplane.cpus``. With SMT two hardware threads of a
core share its execution units and caches, so four workers on the two threads of two cores
do about what two workers do; how Linux numbers the threads varies (``0,1`` siblings, or
``0`` and ``N/2``). :func:`spread` orders CPUs so that the first hardware thread of every
core comes before the second of any (the kernel's topology in sysfs, Documentation/ABI/
stable/sysfs-devices-system-cpu); without that information the order is numeric.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["core_of", "siblings", "spread"]

SYSFS_CPU = "/sys/devices/system/cpu"


def core_of(cpu: int, root: str = SYSFS_CPU) -> tuple[int, int]:
    """(package, core) of a CPU; (0, -1 - cpu) when sysfs does not say (a core of its own)."""
    topo = os.path.join(root, f"cpu{cpu}", "topology")
    try:
        with open(os.path.join(topo, "physical_package_id")) as f:
            package = int(f.read())
        with open(os.path.join(topo, "core_id")) as f:
            core = int(f.read())
    except (OSError, ValueError):
        return 0, -1 - cpu
    return package, core


def spread(cpus: Iterable[int], root: str = SYSFS_CPU) -> tuple[int, ...]:
    """``cpus``, one hardware thread of each physical core first (cores in order of their
    lowest CPU), then the second thread of each, and so on."""
    threads: dict[tuple[int, int], list[int]] = {}
    for cpu in sorted(set(cpus)):
        threads.setdefault(core_of(cpu, root), []).append(cpu)
    cores = sorted(threads.values())
    depth = max((len(t) for t in cores), default=0)
    return tuple(t[k] for k in range(depth) for t in cores if k < len(t))


def siblings(cpu: int, cpus: Iterable[int], root: str = SYSFS_CPU) -> tuple[int, ...]:
    """The CPUs of ``cpus`` on the same physical core as ``cpu`` (itself first)."""
    core = core_of(cpu, root)
    return (cpu, *(c for c in sorted(set(cpus)) if c != cpu and core_of(c, root) == core))
