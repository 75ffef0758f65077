"""Worker CPU order (pipeline/cpus.py) on CPU topologies written as sysfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cpus import core_of, siblings, spread


def sysfs(tmp_path: Path, cores: dict[int, tuple[int, int]]) -> str:
    """A /sys/devices/system/cpu with each CPU's (package, core)."""
    for cpu, (package, core) in cores.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return str(tmp_path)


def test_adjacent_siblings(tmp_path: Path) -> None:
    """Intel's usual numbering on many VMs: CPUs 2k and 2k+1 are one core."""
    root = sysfs(tmp_path, {cpu: (0, cpu // 2) for cpu in range(8)})
    assert spread(range(8), root) == (0, 2, 4, 6, 1, 3, 5, 7)
    assert siblings(2, range(8), root) == (2, 3)
    assert spread([3, 1, 2], root) == (1, 2, 3)  # core 0 has only CPU 1 allowed


def test_split_siblings_and_two_packages(tmp_path: Path) -> None:
    """CPU k and k + 4 are one core; two packages whose core ids repeat."""
    cores = {cpu: (cpu % 4 // 2, cpu % 2) for cpu in range(8)}
    root = sysfs(tmp_path, cores)
    assert spread(range(8), root) == (0, 1, 2, 3, 4, 5, 6, 7)
    assert siblings(1, range(8), root) == (1, 5)
    assert core_of(6, root) == (1, 0)


@pytest.mark.parametrize("cpus", [(3, 0, 2), ()])
def test_without_topology_the_order_is_numeric(tmp_path: Path, cpus: tuple[int, ...]) -> None:
    assert spread(cpus, str(tmp_path)) == tuple(sorted(cpus))
    assert siblings(5, cpus, str(tmp_path)) == (5,)
