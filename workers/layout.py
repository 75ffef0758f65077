"""Header layouts as numpy structured dtypes, viewed in place across the slots of a batch.

A batch keeps packet ``i`` in slot ``i`` (pipeline/batch.py). When every packet of a group
starts at the same offset inside its slot, a structured array with the slot size as its
stride *is* the group's headers: ``rows(...)["esp"]["spi"]`` reads every SPI at once, and
assigning to a field writes every packet. Field names and widths come from the RFCs cited
beside them; nothing else in the data plane hard-codes a header offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ESP_HDR",
    "bytes_dtype",
    "INNER_PEEK",
    "IPV4_HDR",
    "IPV6_HDR",
    "UDP_HDR",
    "GroupRows",
    "first_failure",
    "group_by",
    "header_dtype",
    "rows",
]

# RFC 791 §3.1 (no options; options ride along as raw bytes, see header_dtype).
IPV4_HDR = np.dtype([
    ("ver_ihl", "u1"), ("tos", "u1"), ("total_length", ">u2"), ("ident", ">u2"),
    ("frag", ">u2"), ("ttl", "u1"), ("proto", "u1"), ("checksum", ">u2"),
    ("src", "u1", (4,)), ("dst", "u1", (4,)),
])
# RFC 8200 §3.
IPV6_HDR = np.dtype([
    ("ver_tc_flow", ">u4"), ("payload_length", ">u2"), ("next_header", "u1"),
    ("hop_limit", "u1"), ("src", "u1", (16,)), ("dst", "u1", (16,)),
])
# RFC 768; RFC 3948 §2.1 for its use in front of ESP.
UDP_HDR = np.dtype([("sport", ">u2"), ("dport", ">u2"), ("length", ">u2"), ("checksum", ">u2")])
# RFC 4303 §2.1-2.2.
ESP_HDR = np.dtype([("spi", ">u4"), ("seq", ">u4")])
# The first 8 bytes of an IPv4 or IPv6 header: enough to tell the version, the TOS or
# traffic class, the DF bit (byte 6 of IPv4) and the length field of either.
INNER_PEEK = np.dtype([
    ("b0", "u1"), ("b1", "u1"), ("w2", ">u2"), ("w4", ">u2"), ("b6", "u1"), ("b7", "u1"),
])


@lru_cache(maxsize=256)
def header_dtype(ip_version: int, ip_len: int, udp: bool, iv_len: int) -> np.dtype[Any]:
    """[IP header][UDP][ESP header][IV] as one record; ``ip_version`` 0 means no IP header."""
    fields: list[tuple[str, object]] = []
    if ip_version == 4:
        fields.append(("ip", IPV4_HDR))
        if ip_len > IPV4_HDR.itemsize:
            fields.append(("ip_options", np.dtype(("u1", (ip_len - IPV4_HDR.itemsize,)))))
    elif ip_version == 6:
        fields.append(("ip", IPV6_HDR))
    if udp:
        fields.append(("udp", UDP_HDR))
    fields.append(("esp", ESP_HDR))
    if iv_len == 8:
        fields.append(("iv", np.dtype(">u8")))
    elif iv_len:
        fields.append(("iv", np.dtype(("u1", (iv_len,)))))
    return np.dtype(fields)


_ROWS: dict[tuple[int, np.dtype[Any], int, int], npt.NDArray[Any]] = {}


def rows(data: npt.NDArray[np.uint8], dtype: np.dtype[Any], slot_size: int,
         in_slot: int) -> npt.NDArray[Any]:
    """A record per slot, at byte ``in_slot`` of each slot, sharing ``data``'s memory."""
    key = (id(data), dtype, slot_size, in_slot)
    view = _ROWS.get(key)
    if view is not None and view.base is data:
        return view
    capacity = data.shape[0] // slot_size
    if in_slot < 0 or in_slot + dtype.itemsize > slot_size:
        raise ValueError("header does not fit in its slot")
    view = np.ndarray((capacity,), dtype=dtype, buffer=data, offset=in_slot,
                      strides=(slot_size,))
    if len(_ROWS) > 64:  # a worker keeps its batches; tests make many, bound what is pinned
        _ROWS.clear()
    _ROWS[key] = view
    return view


def windows(data: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]:
    """``data`` as overlapping rows: row i is ``data[i : i + width]``. Indexing it with an
    array of offsets reads (or writes) ``width`` bytes at each offset in one operation."""
    key = (id(data), _WINDOWS, 0, width)
    view = _ROWS.get(key)
    if view is not None and view.base is data:
        return view
    view = np.ndarray((data.shape[0] - width + 1, width), dtype=np.uint8, buffer=data,
                      strides=(1, 1))
    _ROWS[key] = view
    return view


_WINDOWS = np.dtype("u1")


class GroupRows:
    """The records of a group of slots: a live view when the group is slots 0..n-1 (the
    common case, no copy), else a gathered copy written back by ``commit``."""

    __slots__ = ("_all", "_slots", "_raw", "rec")

    def __init__(self, data: npt.NDArray[np.uint8], dtype: np.dtype[Any], slot_size: int,
                 in_slot: int, slots: npt.NDArray[np.int64], dense: bool) -> None:
        self._all = rows(data, dtype, slot_size, in_slot)
        self._slots = None if dense else slots
        self.rec = self._all[: slots.size] if dense else self._all[slots]
        self._raw = (data, slot_size, in_slot)

    def fill(self, template: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Set every record to ``template``'s bytes (a structured assignment is ~20x slower);
        returns the records as an (n, itemsize) byte array sharing their memory."""
        width = self.rec.dtype.itemsize
        if self._slots is None:
            data, slot_size, in_slot = self._raw
            raw = rows(data, bytes_dtype(width), slot_size, in_slot)[: self.rec.shape[0]]
        else:
            raw = self.rec.view(np.uint8).reshape(-1, width)
        raw[:] = template
        return raw

    def commit(self) -> None:
        if self._slots is not None:
            self._all[self._slots] = self.rec


@lru_cache(maxsize=64)
def bytes_dtype(width: int) -> np.dtype[Any]:
    """``width`` raw bytes as one field: a header viewed as bytes (cached: dtypes are not
    free to build)."""
    return np.dtype(("u1", (width,)))


def group_by(keys: npt.NDArray[np.int64]) -> list[tuple[int, npt.NDArray[np.int64]]]:
    """Positions of equal keys, keys ascending, positions ascending within each group."""
    if keys.size == 0:
        return []
    k0 = int(keys[0])
    if (keys == k0).all():
        return [(k0, np.arange(keys.size))]
    order = np.argsort(keys, kind="stable")
    uniq, starts = np.unique(keys[order], return_index=True)
    return list(zip(uniq.tolist(), np.split(order, starts[1:]), strict=True))


def first_failure(
    checks: Sequence[tuple[npt.NDArray[np.bool_] | None, int]], size: int
) -> npt.NDArray[np.uint8] | None:
    """Verdicts for an ordered table of (failed-mask, verdict) checks, the first failing
    check naming each packet's verdict; None when nothing failed (the fast path).
    A mask of None is a check known to pass for every packet."""
    masks = [m for m, _ in checks if m is not None]
    if not masks:
        return None
    failed = masks[0]
    for extra in masks[1:]:
        failed = failed | extra
    if not failed.any():
        return None
    verdict = np.zeros(size, dtype=np.uint8)
    for mask, code in reversed(checks):
        if mask is not None:
            verdict[mask] = code
    return verdict
