"""The data plane processes' Python heap on transparent huge pages.

Why. After each idle gap the I/O process runs its one-packet path (pipeline/onepacket.py)
on cold caches and TLBs: on the 2-core lab VMs a lone packet costs the I/O process 150-550 us
against about 20 us hot, and every part of the path is slow alike (taking a buffer: 24 us;
the TUN read: 86 us; the AEAD call: 40 us), which is what page walks look like. CPython's
objects live in pymalloc's 1 MiB arenas, mmap'ed one by one and never on huge pages; with
``PYTHONMALLOC=malloc`` they come from glibc's malloc instead, and glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc 2.35) makes malloc ``madvise(MADV_HUGEPAGE)`` its heap,
so that the interpreter's working set sits on a few 2 MiB pages. bench/tunnel.py, same
build, runs one after the other (2 rounds each): idle ping RTT 1.31 and 1.38 ms without,
1.14 and 1.18 ms with; TCP 590 and 541 Mbit/s without, 708 and 627 with. Either variable
alone did not help (malloc without huge pages was slower than pymalloc).

Both are read when the interpreter starts, so they reach a process through its
environment: the I/O process is spawned with them (:func:`spawning`) and its workers inherit
them; ``espline run`` with static SAs, the data plane in its own process, executes itself
again once with them (:func:`reexec`).

The controller keeps pymalloc: IKE allocates many small objects for a short time, which
pymalloc does faster (bench/ike_rate.py, espline responder: 0.82-1.02 ms CPU per setup
with pymalloc, 1.34-1.42 ms with malloc on huge pages).

Where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled``:
``[never]``) or glibc is older or absent, nothing is changed: malloc without huge pages is
the slower choice. An operator's own ``PYTHONMALLOC`` or ``glibc.malloc.hugetlb`` is kept.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator, Mapping

__all__ = ["GC_THRESHOLD0", "GC_THRESHOLD1", "MARKER", "applied", "environ", "log_state",
           "reexec", "settle", "spawning", "supported"]

log = logging.getLogger("espline.heap")

TUNABLE = "glibc.malloc.hugetlb"
MARKER = "ESPLINE_HEAP"  # set in the environment this module made: no second re-exec
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first with glibc.malloc.hugetlb
# The cyclic garbage collector's thresholds in espline's long-running processes (Python's
# defaults: 700, 10, 10). Their work allocates many short-lived objects, nearly all freed by
# reference counting; at 700 the collector runs often and drags its older generations along:
# in the controller it took about 8% of the CPU of IKE setups (bench/ike_rate.py, 0.24 s per
# 3000 setups; at 10000, 0.15 s), in the data plane's I/O process about 15% of what
# installing their Child SAs costs it (perf). The second threshold: what survives the young
# generation on a concentrator is mostly IKE and Child SAs that live for hours, and at 10
# each was walked again by about ten collections of the middle generation before reaching
# the old one; at 50, about once (gc.callbacks, 12000 setups: 84 ms in the middle
# generation's collections against 7 ms). Garbage cycles wait a little longer; nothing else
# changes.
GC_THRESHOLD0 = 10_000
GC_THRESHOLD1 = 50


def supported(thp_path: str = THP_ENABLED, libc: str | None = None) -> str | None:
    """None if huge pages for the heap can work here, else why not (for the log)."""
    if sys.flags.ignore_environment:  # -E or -I: PYTHONMALLOC would be ignored
        return "the interpreter ignores PYTHON* variables (-E or -I)"
    if libc is None:
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION")
        except (ValueError, OSError):
            libc = ""
    name, _, ver = (libc or "").partition(" ")
    try:
        version = tuple(int(x) for x in ver.split(".")[:2])
    except ValueError:
        version = ()
    if name != "glibc" or version < MIN_GLIBC:
        return f"needs glibc {'.'.join(map(str, MIN_GLIBC))} or later (found {libc or 'none'})"
    try:
        with open(thp_path, encoding="ascii") as f:
            mode = f.read()
    except OSError:
        return f"no transparent huge pages ({thp_path} unreadable)"
    if "[always]" not in mode and "[madvise]" not in mode:
        return f"transparent huge pages are off ({thp_path}: {mode.strip()})"
    return None


def environ(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with the heap on huge pages (variables the operator set are kept)."""
    env = dict(base)
    env.setdefault("PYTHONMALLOC", "malloc")
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.partition("=")[0] == TUNABLE for t in tunables):
        tunables.append(f"{TUNABLE}=1")
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    env[MARKER] = "hugepages"
    return env


def applied(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process (or ``env``) was started by this module's environment."""
    return (os.environ if env is None else env).get(MARKER) == "hugepages"


def _possible(enabled: bool) -> bool:
    """Whether to put the heap on huge pages; if not, the log says why."""
    why = supported() if enabled else "dataplane.hugepages is false"
    if why is not None:
        log.info("data plane heap: default allocator (%s)", why)
    return why is None


@contextlib.contextmanager
def spawning(enabled: bool) -> Iterator[None]:
    """While in the block, processes started (multiprocessing's ``spawn``, which passes this
    process's environment on) get the heap on huge pages; this process's own environment is
    as before afterwards."""
    if not _possible(enabled):
        yield
        return
    wanted = environ(os.environ)
    saved = {k: os.environ.get(k) for k, v in wanted.items() if os.environ.get(k) != v}
    os.environ.update({k: wanted[k] for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():  # only what this changed, put back
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def log_state() -> None:
    """Say in the log whether this process's heap is on huge pages."""
    if applied():
        log.info("data plane heap: transparent huge pages (PYTHONMALLOC=%s, GLIBC_TUNABLES=%s)",
                 os.environ.get("PYTHONMALLOC"), os.environ.get("GLIBC_TUNABLES"))


def reexec(enabled: bool) -> None:
    """Execute this program again with the heap on huge pages, unless it runs so already,
    ``enabled`` is false or they cannot work here. Returns only when it does not re-execute
    (an exec that fails is logged, and the process goes on as it is)."""
    if applied() or not _possible(enabled):
        return
    argv = list(getattr(sys, "orig_argv", ()))
    if not argv or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, environ(os.environ))
    except OSError as exc:
        log.warning("data plane heap: cannot re-execute %s (%s): default allocator",
                    sys.executable, exc)


def settle(threshold0: int = GC_THRESHOLD0, threshold1: int = GC_THRESHOLD1) -> None:
    """Call once a process has started: what start-up made (modules, configuration, sockets,
    tables) lives as long as the process, so it leaves the cyclic collector's generations
    (``gc.freeze``), which then walk only what the work makes; and the collector runs every
    ``threshold0`` allocations rather than 700, its middle generation after ``threshold1``
    young collections rather than 10."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold0, threshold1, *gc.get_threshold()[2:])
