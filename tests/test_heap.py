"""pipeline/heap.py: the environment that puts a data plane process's heap on huge pages.

The end-to-end checks (a static-SA gateway re-executes itself with it, and its heap holds
huge pages; a gateway with IKE spawns its I/O process with it and keeps pymalloc itself)
are in tests/test_e2e_static.py and tests/test_e2e_ike.py.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import heap

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_environ_adds_the_allocator_and_the_tunable() -> None:
    env = heap.environ({"PATH": "/bin"})
    assert env["PYTHONMALLOC"] == "malloc"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert env["PATH"] == "/bin" and heap.applied(env)
    assert not heap.applied({"PATH": "/bin"})


def test_environ_keeps_what_the_operator_set() -> None:
    env = heap.environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PYTHONMALLOC": "debug"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["PYTHONMALLOC"] == "debug"
    own = heap.environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=0"})
    assert own["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=0"


@pytest.mark.parametrize(("mode", "libc", "ok"), [
    ("always [madvise] never\n", "glibc 2.36", True),
    ("[always] madvise never\n", "glibc 2.35", True),
    ("always madvise [never]\n", "glibc 2.36", False),
    ("always [madvise] never\n", "glibc 2.34", False),  # no glibc.malloc.hugetlb
    ("always [madvise] never\n", "", False),  # not glibc (musl): no such tunable
    (None, "glibc 2.36", False),  # no THP in the kernel
])
def test_supported_needs_thp_and_glibc_2_35(tmp_path: Path, mode: str | None, libc: str,
                                            ok: bool) -> None:
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode)
    why = heap.supported(str(path), libc)
    assert (why is None) == ok, why
    if not ok:
        assert why  # a reason for the log


def test_supported_needs_the_environment_read(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Under -E or -I, CPython ignores PYTHONMALLOC: nothing to gain from the tunable alone."""
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert heap.supported(str(path), "glibc 2.36") is None
    flags = type("Flags", (), {"ignore_environment": 1})()
    monkeypatch.setattr(heap.sys, "flags", flags)
    assert "-E" in (heap.supported(str(path), "glibc 2.36") or "")


def _report(queue: multiprocessing.Queue[tuple[str | None, str | None, str | None]]) -> None:
    queue.put((os.environ.get("PYTHONMALLOC"), os.environ.get("GLIBC_TUNABLES"),
               os.environ.get(heap.MARKER)))


def _spawn_child_env(enabled: bool) -> tuple[str | None, str | None, str | None]:
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[tuple[str | None, str | None, str | None]] = ctx.Queue()
    proc = ctx.Process(target=_report, args=(queue,))
    with heap.spawning(enabled):
        proc.start()
    try:
        return queue.get(timeout=60)
    finally:
        proc.join(30)


def test_spawning_reaches_the_child_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process spawned in the block starts with the environment; this one is unchanged."""
    monkeypatch.setattr(heap, "supported", lambda: None)
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    before = dict(os.environ)
    got = _spawn_child_env(True)
    assert got == ("malloc", "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", "hugepages")
    assert dict(os.environ) == before
    assert _spawn_child_env(False) == (None, "glibc.malloc.arena_max=4", None)


def test_spawning_leaves_the_environment_where_unsupported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "supported", lambda: "transparent huge pages are off")
    monkeypatch.delenv("PYTHONMALLOC", raising=False)
    assert _spawn_child_env(True)[0] is None


def test_reexec_does_nothing_when_applied_or_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where it must not re-execute, it returns (an exec here would replace pytest)."""
    calls: list[object] = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(heap, "supported", lambda: None)
    heap.reexec(False)
    monkeypatch.setenv(heap.MARKER, "hugepages")
    heap.reexec(True)
    assert calls == []
    monkeypatch.delenv(heap.MARKER)
    heap.reexec(True)
    assert len(calls) == 1
    executable, argv, env = calls[0]  # type: ignore[misc]
    assert executable and argv and heap.applied(env)


def test_settle_freezes_start_up_and_raises_the_first_threshold() -> None:
    # In a fresh interpreter: the test process's own collector stays as it is.
    code = ("import gc; from pipeline import heap; before = gc.get_threshold(); "
            "heap.settle(); after = gc.get_threshold(); "
            "print(gc.get_freeze_count(), before[0], after[0], after[1], before[2:] == after[2:])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT).stdout.split()
    frozen, before, after, after1, rest_kept = (int(out[0]), int(out[1]), int(out[2]),
                                                int(out[3]), out[4])
    assert frozen > 1000  # the modules' objects, out of the generations
    assert before == 700 and after == heap.GC_THRESHOLD0 and after1 == heap.GC_THRESHOLD1
    assert rest_kept == "True"
