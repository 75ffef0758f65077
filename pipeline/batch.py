"""The batch: the unit of work between packet I/O and the workers (DESIGN §3).

A batch is one contiguous data buffer cut into fixed-size *slots*, plus a numpy structured
array of per-packet metadata. Packet ``i`` always lives inside slot ``i``; within its slot it
starts at ``offset`` (an absolute offset into ``data``) and spans ``length`` bytes. Slots give
every packet headroom (for outer headers prepended on encap) and tailroom (for the ESP
trailer and ICV), so the codecs work in place, like VPP's buffers with their pre-data area.

The verdict column is the per-packet outcome: ``Verdict.PASS`` or the reason it was dropped.
Drop reasons follow the names operators know from Linux ``xfrm_stat`` and VPP counters.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from enum import IntEnum

import numpy as np
import numpy.typing as npt

__all__ = [
    "HEADROOM",
    "META_DTYPE",
    "MSS_CLAMPED",
    "SLOT_SIZE",
    "TAILROOM",
    "Batch",
    "Verdict",
]

# Headroom covers the largest header stack prepended in front of a packet: outer IPv6 (40) +
# UDP (8) + ESP header (8) + CBC IV (16) = 72; AH over IPv6: 40 + 12 + 32-byte ICV + 4 = 88.
# 128 keeps every packet start 64-byte aligned in 2 KiB slots.
HEADROOM = 128
# Tailroom covers the ESP trailer: TFC padding is bounded separately, padding <= 255,
# Pad Length + Next Header = 2, the largest ICV (HMAC-SHA-512-256) = 32, and 4 bytes for the
# ESN high bits appended for the ICV computation (RFC 4303 §2.2.1): 255 + 2 + 32 + 4 < 320.
TAILROOM = 320
# Default slot: an Ethernet MTU packet plus headroom and tailroom, rounded up.
SLOT_SIZE = 2048

META_DTYPE = np.dtype(
    [
        ("offset", "<u4"),  # absolute offset of the packet's first byte in data
        ("length", "<u4"),  # packet length in bytes
        ("sa", "<u4"),  # SA index in the data plane's SA table
        ("verdict", "u1"),  # Verdict
        ("flags", "u1"),  # MSS_CLAMPED; readers clear it
        ("inner_length", "<u2"),  # outbound: the length as read, before encapsulation
        ("seq", "<u8"),  # 64-bit sequence number (outbound: reserved; inbound: inferred)
    ]
)
# META_DTYPE flags: a worker lowered this SYN's MSS (the I/O process counts them).
MSS_CLAMPED = 0x01
# One META_DTYPE row as a struct: Batch.row / Batch.set_row.
META_ROW = struct.Struct("<IIIBBHQ")
assert META_ROW.size == META_DTYPE.itemsize and META_DTYPE.names == (
    "offset", "length", "sa", "verdict", "flags", "inner_length", "seq")


class Verdict(IntEnum):
    """Per-packet outcome. Every value but PASS and PARKED is a counted drop reason."""

    PASS = 0
    RUNT = 1  # shorter than its headers or than its length fields claim
    NO_SA = 2  # no SA for this SPI (or SA index)
    INTEGRITY = 3  # ICV / AEAD tag verification failed
    REPLAY = 4  # duplicate, or left of the anti-replay window
    PAD = 5  # bad padding, pad length or payload alignment
    ENCAP = 6  # UDP encapsulation mismatch, or a non-ESP (IKE) packet on the ESP path
    PROTO = 7  # unexpected Next Header or IP version
    DUMMY = 8  # dummy packet (Next Header 59), dropped silently (RFC 4303 §2.6)
    KEEPALIVE = 9  # NAT keepalive (RFC 3948 §2.3), consumed silently
    SEQ_OVERFLOW = 10  # no sequence number left on this SA (RFC 4303 §3.3.3)
    TOO_BIG = 11  # the packet does not fit its slot once headers are added
    FRAGMENT = 12  # an IP fragment reached the codec (reassembly happens before it)
    UNSUPPORTED = 13  # a header layout this data plane does not process (e.g. IPv6 ext. hdrs)
    POLICY = 14  # outbound: no SPD entry protects it, or one says discard (RFC 4301 §5.1)
    LOST = 15  # its batch was lost with a worker and skipped by the reassembler
    # Not a drop: inbound ESP for an SPI not known yet, held while an install may be on its
    # way from the controller and looked up again (pipeline/dataplane.py ``_park``).
    PARKED = 16

    @property
    def is_drop(self) -> bool:
        """Whether a packet with this verdict was dropped (counted by reason)."""
        return self not in (Verdict.PASS, Verdict.PARKED)

    @property
    def label(self) -> str:
        return self.name.lower()


class Batch:
    """A batch of packets in fixed-size slots, with numpy metadata.

    ``meta`` and ``data`` are preallocated for ``capacity`` slots and reused batch after batch;
    ``count`` says how many slots are in use.
    """

    __slots__ = ("batch_id", "buffer", "capacity", "count", "data", "head", "meta",
                 "region", "sa_version", "slot_size", "src", "_views")

    def __init__(self, capacity: int = 256, slot_size: int = SLOT_SIZE, *,
                 meta: npt.NDArray[np.void] | None = None,
                 data: npt.NDArray[np.uint8] | None = None, buffer: int = -1,
                 src: npt.NDArray[np.int64] | None = None) -> None:
        """A batch with its own zeroed buffers, or (``meta``, ``data``, ``src``, ``buffer``)
        one over memory it does not own: a buffer of a shared
        :class:`pipeline.shmpool.BatchPool`."""
        if capacity <= 0:
            raise ValueError(f"batch capacity must be positive, got {capacity}")
        if slot_size < HEADROOM + TAILROOM + 64 or slot_size % 64:
            raise ValueError(f"slot_size must be a multiple of 64 and >= 512, got {slot_size}")
        self.capacity = capacity
        self.slot_size = slot_size
        self.count = 0
        self.batch_id = 0
        self.sa_version = 0  # the SA table version it was classified with (pipeline/sadist.py)
        if meta is None or data is None:
            meta = np.zeros(capacity, dtype=META_DTYPE)
            data = np.zeros(capacity * slot_size, dtype=np.uint8)
        elif meta.shape != (capacity,) or meta.dtype != META_DTYPE or data.shape != (
                capacity * slot_size,) or data.dtype != np.uint8:
            raise ValueError("meta/data do not match the batch geometry")
        if src is None:
            src = np.zeros(capacity, dtype=np.int64)
        elif src.shape != (capacity,) or src.dtype != np.int64:
            raise ValueError("src does not match the batch geometry")
        self.meta: npt.NDArray[np.void] = meta
        self.data: npt.NDArray[np.uint8] = data
        # Heads only (pipeline/region.py): ``region`` >= 0 says each slot holds just the
        # first ``head`` bytes of its packet (0: nothing), whose whole lies at ``src[i]``
        # in that shared region (the reader's memory, e.g. an AF_PACKET ring); -1: every
        # packet is whole in its slot.
        self.region = -1
        self.head = 0
        self.src: npt.NDArray[np.int64] = src
        self.buffer = buffer  # its index in the shared pool; -1: a private batch
        # Per-slot memoryview caches owned by the codecs (see workers/views.py). They are
        # tied to this buffer, which is why a batch is reused rather than reallocated.
        self._views: dict[object, object] = {}

    @staticmethod
    def max_packet_for(slot_size: int) -> int:
        return slot_size - HEADROOM - TAILROOM

    @property
    def max_packet(self) -> int:
        return self.max_packet_for(self.slot_size)

    @classmethod
    def for_packets(cls, packets: Iterable[bytes], slot_size: int | None = None) -> Batch:
        """A new batch holding ``packets`` (a convenience for tests, tools and benchmarks)."""
        pkts = list(packets)
        longest = max((len(p) for p in pkts), default=0)
        if slot_size is None:
            slot_size = max(SLOT_SIZE, -(-(longest + HEADROOM + TAILROOM) // 64) * 64)
        batch = cls(max(1, len(pkts)), slot_size)
        batch.load(pkts)
        return batch

    def load(self, packets: Iterable[bytes], sa: int = 0) -> None:
        """Place packets at the start of their slots' payload area (after the headroom)."""
        self.count = 0
        self.region = -1
        meta = self.meta
        for i, pkt in enumerate(packets):
            if i >= self.capacity:
                raise ValueError(f"more packets than the batch capacity {self.capacity}")
            if len(pkt) > self.max_packet:
                raise ValueError(f"packet of {len(pkt)} bytes exceeds the slot payload area")
            start = i * self.slot_size + HEADROOM
            self.data[start : start + len(pkt)] = np.frombuffer(pkt, dtype=np.uint8)
            meta[i] = (start, len(pkt), sa, Verdict.PASS, 0, 0, 0)
            self.count = i + 1

    def slot_starts(self) -> npt.NDArray[np.int64]:
        """Where each slot begins in ``data`` (cached on the batch: the codecs and the
        dispatcher index with it batch after batch)."""
        starts = self._views.get("bases")
        if not isinstance(starts, np.ndarray):
            starts = np.arange(self.capacity, dtype=np.int64) * self.slot_size
            self._views["bases"] = starts
        return starts

    # -- one packet's metadata without numpy (pipeline/onepacket.py) -----------------------
    def memory(self) -> tuple[memoryview, memoryview]:
        """(data, meta) as byte memoryviews over the batch's buffers (cached): for code that
        handles a lone packet, where a numpy call costs more than the work."""
        views = self._views.get("memoryviews")
        if not isinstance(views, tuple):
            views = (memoryview(self.data).cast("B"),  # type: ignore[arg-type]
                     memoryview(self.meta.view(np.uint8)).cast("B"))  # type: ignore[arg-type]
            self._views["memoryviews"] = views
        return views

    def row(self, i: int) -> tuple[int, int, int, int, int, int, int]:
        """Slot ``i``'s metadata: (offset, length, sa, verdict, flags, inner_length, seq)."""
        return META_ROW.unpack_from(self.memory()[1], i * META_ROW.size)

    def set_row(self, i: int, offset: int, length: int, sa: int = 0, verdict: int = 0,
                seq: int = 0, inner_length: int = 0) -> None:
        META_ROW.pack_into(self.memory()[1], i * META_ROW.size, offset, length, sa, verdict,
                           0, inner_length, seq)

    def packet(self, i: int) -> bytes:
        m = self.meta[i]
        off = int(m["offset"])
        return self.data[off : off + int(m["length"])].tobytes()

    def packets(self) -> list[bytes]:
        """The packets that passed, in order."""
        return [self.packet(i) for i in range(self.count) if self.meta["verdict"][i] == 0]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """(verdict, bytes) for each packet in use."""
        for i in range(self.count):
            yield int(self.meta["verdict"][i]), self.packet(i)

    def active(self) -> npt.NDArray[np.void]:
        return self.meta[: self.count]

    def verdict_counts(self) -> dict[str, int]:
        counts = np.bincount(self.meta["verdict"][: self.count], minlength=len(Verdict))
        return {Verdict(v).label: int(c) for v, c in enumerate(counts) if c and v}

    def copy_from(self, other: Batch) -> None:
        """Take ``other``'s packets into this (preallocated) batch: the receive step."""
        if other.slot_size != self.slot_size or other.count > self.capacity:
            raise ValueError("batch geometry differs")
        if other.region >= 0:
            raise ValueError("a batch of packet heads is completed before it is copied")
        n = other.count
        self.count = n
        self.region = -1
        self.batch_id = other.batch_id
        self.meta[:n] = other.meta[:n]
        np.copyto(self.data[: n * self.slot_size], other.data[: n * self.slot_size])
