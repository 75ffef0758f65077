"""Batch buffers in shared memory: the I/O process and its workers hand batches over by index.

DESIGN §3 first sent each batch's metadata and data as ZeroMQ frames. Measured on the 16-core
machine (bench/scaling.py, 1400-byte packets, batch 256), one I/O process then moved at most
about 250 000 packets/s, whatever the number of workers: every batch crossed the ipc socket
twice (to a worker and back), four copies of half a megabyte and the zero-copy bookkeeping of
pyzmq in the I/O loop. Here the buffers live in one file under the runtime directory (a tmpfs:
Kubernetes' ``emptyDir: {medium: Memory}``), mapped by the I/O process and every worker; a
ZeroMQ message carries only the 20-byte header naming the buffer (pipeline/transport.py).

Ownership moves with the messages: the I/O process fills a free buffer and sends its index to
one worker, which alone touches it until its answer names the buffer again. A buffer is
never reused while a worker may still write to it: only the answer, or the death of the
worker that held it (pipeline/dataplane.py keeps the ledger), returns it to the free list.

Layout, per buffer: ``capacity`` metadata records (``META_DTYPE``), padded to a page;
``capacity`` int64 source offsets (``Batch.src``, pipeline/region.py), padded to a page;
then ``capacity`` slots of ``slot_size`` bytes, padded to a page.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

import numpy as np

from pipeline.batch import META_DTYPE, Batch

__all__ = ["BatchPool"]

_PAGE = mmap.PAGESIZE


def _pages(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class BatchPool:
    """``buffers`` batches of ``capacity`` x ``slot_size`` in the file ``path``.

    ``create=True`` makes the file (mode 0600, never an existing one) and removes it on
    :meth:`close`; ``create=False`` maps the file another process made, which must have
    exactly this geometry.
    """

    def __init__(self, path: str, buffers: int, capacity: int, slot_size: int, *,
                 create: bool) -> None:
        if buffers <= 0:
            raise ValueError(f"a pool needs at least one buffer, got {buffers}")
        self.path = path
        self.capacity = capacity
        self.slot_size = slot_size
        self._meta_bytes = _pages(capacity * META_DTYPE.itemsize)
        self._src_bytes = _pages(capacity * 8)
        self._data_bytes = _pages(capacity * slot_size)
        stride = self._meta_bytes + self._src_bytes + self._data_bytes
        size = stride * buffers
        self._owner = create
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ValueError(f"{path}: {actual} bytes, want {size} for {buffers} buffers "
                                 f"of {capacity} x {slot_size}")
            self._mm: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        whole = np.frombuffer(self._mm, dtype=np.uint8)
        self._batches = []
        for i in range(buffers):
            at = i * stride
            meta = whole[at : at + capacity * META_DTYPE.itemsize].view(META_DTYPE)
            at += self._meta_bytes
            src = whole[at : at + capacity * 8].view(np.int64)
            at += self._src_bytes
            data = whole[at : at + capacity * slot_size]
            self._batches.append(Batch(capacity, slot_size, meta=meta, data=data, src=src,
                                       buffer=i))

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, index: int) -> Batch:
        return self._batches[index]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)

    @property
    def nbytes(self) -> int:
        return len(self._batches) * (self._meta_bytes + self._src_bytes + self._data_bytes)

    def close(self) -> None:
        """Unmap (when no view of it is left elsewhere) and, for the creator, remove the file."""
        self._batches = []
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: GC unmaps
                self._mm.close()
            self._mm = None
        if self._owner:
            self._owner = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> BatchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
