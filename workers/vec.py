"""Vectorized byte access on a batch buffer: gather/scatter of fixed-width fields at per-packet
offsets, big-endian integers, and the Internet checksum (RFC 1071) over many headers at once.

Everything here works on arrays of offsets into one flat ``uint8`` buffer, so a header field
of every packet in a batch is read or written with one numpy operation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

__all__ = [
    "be16", "be32", "gather", "gather_masked", "inet_checksum", "ipv4_checksum", "peek",
    "put_be16", "put_be32", "scatter", "scatter_masked",
]

Buf = npt.NDArray[np.uint8]
Offsets = npt.NDArray[np.int64]


def gather(data: Buf, off: Offsets, width: int) -> Buf:
    """(n, width) array of the bytes at ``off[i] .. off[i] + width``."""
    rows: Buf = data[off[:, None] + np.arange(width)]
    return rows


@lru_cache(maxsize=64)
def _record(width: int) -> np.dtype[np.void]:
    return np.dtype((np.void, width))


_PEEK_KEY = "vec.peek"


def peek(data: Buf, off: Offsets, width: int,
         cache: dict[object, object] | None = None) -> Buf:
    """``gather`` as one 1-D gather of ``width``-byte records (a 2-D fancy index costs
    several times more): a copy, (n, width), of the bytes at ``off[i] .. off[i] + width``.
    ``cache`` (the batch's ``_views``, tied to ``data``) keeps the record view for the next
    call."""
    key = (_PEEK_KEY, width)
    records = cache.get(key) if cache is not None else None
    if not isinstance(records, np.ndarray):
        # ``data`` as overlapping records, record i starting at byte i.
        records = np.ndarray((data.shape[0] - width + 1,), dtype=_record(width), buffer=data,
                             strides=(1,))
        if cache is not None:
            cache[key] = records
    rows: Buf = records[off].view(np.uint8).reshape(-1, width)
    return rows


def gather_masked(data: Buf, off: Offsets, widths: npt.NDArray[np.int64]) -> Buf:
    """(n, max width) rows of ``widths[i]`` bytes at ``off[i]``, zero beyond; no over-read."""
    cols = np.arange(int(widths.max()) if widths.size else 0)
    inside = cols[None, :] < widths[:, None]
    rows: Buf = np.zeros(inside.shape, dtype=np.uint8)
    rows[inside] = data[(off[:, None] + cols)[inside]]
    return rows


def scatter(data: Buf, off: Offsets, values: npt.NDArray[np.uint8]) -> None:
    """Write row ``i`` of ``values`` (n, width) at ``off[i]``."""
    data[off[:, None] + np.arange(values.shape[1])] = values


def scatter_masked(data: Buf, off: Offsets, values: Buf, widths: npt.NDArray[np.int64]) -> None:
    """Write the first ``widths[i]`` bytes of row ``i`` of ``values`` at ``off[i]``."""
    cols = np.arange(values.shape[1])
    mask = cols[None, :] < widths[:, None]
    data[(off[:, None] + cols)[mask]] = values[mask]


def be16(data: Buf, off: Offsets) -> npt.NDArray[np.int64]:
    return (data[off].astype(np.int64) << 8) | data[off + 1]


def be32(data: Buf, off: Offsets) -> npt.NDArray[np.uint32]:
    b = gather(data, off, 4).astype(np.uint32)
    word = (b[:, 0] << 24) | (b[:, 1] << 16) | (b[:, 2] << 8) | b[:, 3]
    return word.astype(np.uint32)


def put_be16(data: Buf, off: Offsets, value: npt.ArrayLike) -> None:
    v = np.asarray(value, dtype=np.int64)
    data[off] = (v >> 8) & 0xFF
    data[off + 1] = v & 0xFF


def put_be32(data: Buf, off: Offsets, value: npt.ArrayLike) -> None:
    v = np.broadcast_to(np.asarray(value, dtype=np.uint64), off.shape)
    scatter(data, off, v.astype(">u4").view(np.uint8).reshape(-1, 4))


def inet_checksum(rows: Buf, initial: npt.NDArray[np.int64] | int = 0) -> npt.NDArray[np.int64]:
    """RFC 1071 checksum of each row of ``rows`` (n, width); odd widths are zero-padded."""
    if rows.shape[1] % 2:
        rows = np.pad(rows, ((0, 0), (0, 1)))
    words = rows.astype(np.int64)
    total = (words[:, 0::2] << 8).sum(axis=1) + words[:, 1::2].sum(axis=1) + initial
    while True:
        folded = (total & 0xFFFF) + (total >> 16)
        if np.array_equal(folded, total):
            break
        total = folded
    csum: npt.NDArray[np.int64] = ~total & 0xFFFF
    return csum


IPV4_CHECKSUM_OFFSET = 10  # RFC 791 §3.1: Header Checksum, octets 10-11


def ipv4_checksum(data: Buf, at: Offsets, ihl_bytes: npt.NDArray[np.int64] | int) -> None:
    """Recompute the header checksum (RFC 791 §3.1, RFC 1071) of the IPv4 headers at ``at``,
    each ``ihl_bytes`` long (one length for all, or one per header)."""
    put_be16(data, at + IPV4_CHECKSUM_OFFSET, 0)
    if isinstance(ihl_bytes, int):
        rows = gather(data, at, ihl_bytes)
    else:
        rows = gather_masked(data, at, ihl_bytes)
    put_be16(data, at + IPV4_CHECKSUM_OFFSET, inet_checksum(rows))
