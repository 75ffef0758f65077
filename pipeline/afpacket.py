"""AF_PACKET packet I/O for the data plane: TPACKET_V3 RX rings, batched TX (DESIGN §2, §7).

Linux only. Three pieces:

* :class:`RxRing` reads packets from a TPACKET_V3 ring into a :class:`~pipeline.batch.Batch`,
  one L3 packet per slot at ``HEADROOM``, with an optional classic BPF filter
  (:mod:`pipeline.bpf`) and PACKET_FANOUT to spread flows over several I/O processes.
* :class:`TxPath` sends a batch's passing packets out of an interface, with Ethernet headers
  resolved from the kernel's route and neighbour tables (:class:`NeighbourCache`).
* :func:`suppress_esp_unreachable` keeps the kernel from answering the ESP we capture.

AF_PACKET only *copies*: the kernel's own stack still receives every packet the ring sees.
Without an ESP handler (CONFIG_INET_ESP unset, or no xfrm state) Linux answers each raw ESP
packet with ICMP protocol unreachable (IPv4 type 3 code 2; IPv6 parameter problem, code 1),
rate limited but still a storm at line rate. Measured on Linux 6.18 without CONFIG_INET_ESP
(tests/test_afpacket.py repeats it): one raw ``IPPROTO_ESP`` socket in the namespace makes
the kernel count the packet as delivered, and no ICMP is sent; the socket's filter drops
everything so nothing is queued. ESP-in-UDP is the UDP 4500 socket's business: it must exist
(else ICMP port unreachable) and should carry :func:`pipeline.bpf.nat_t_socket_filter`.

TX mechanisms, measured with ``ESPLINE_BENCH=1 pytest tests/test_afpacket.py -k bench -s``:
1400-byte IPv4 ESP packets, batch 256, veth pair between two namespaces, Linux 6.18, Python
3.11, on a shared 2-vCPU VM (load average ~2 from other work, so the spread is wide). Median
packets/s of 5 interleaved 0.3 s rounds, three runs; every packet sent reached the peer:

====================================  ==========================
sendmmsg (ctypes, one syscall/batch)  250 000 - 300 000 pps
TPACKET_V2 TX ring + one send()       180 000 - 270 000 pps
sendmsg, one syscall per packet       140 000 - 200 000 pps
====================================  ==========================

``sendmmsg`` was ahead in every run and is the default: the Ethernet header goes into the
batch's headroom in front of each packet, and one ``sendmmsg`` sends the batch straight from
the batch buffer with no Python loop per packet; the TX ring needs a Python-level copy per
packet into the ring (the kernel's ``tpacket_snd`` then copies again into an skb). On veth
the sender's syscall also pays for the peer's receive path (veth delivers in the sender's
softirq), so these figures are dominated by the kernel: Python's share is about 50-120 µs a
batch. PACKET_QDISC_BYPASS made no difference (veth has no qdisc: ``noqueue``).
``method="ring"`` and ``"sendmsg"`` stay selectable; ``"sendmsg"`` is also the fallback
where ctypes' ``sendmmsg`` is not available (non-LP64).

RX: :meth:`RxRing.read_into` takes about 2.5 µs a packet (about 400 000 packets/s of
1400 bytes on the same machine), of which the per-packet slice copy and the frame-list walk
are the only Python-level loops. :meth:`RxRing.read_heads` copies at most each packet's
first bytes and keeps the ring block until :meth:`RxRing.release`: the workers copy the
packets from their own mapping of the ring (pipeline/region.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from pipeline import bpf as _bpf
from pipeline.batch import HEADROOM, Batch
from pipeline.neighbours import NeighbourCache
from pipeline.offload import VNET_HDR, VNET_HDR_LEN, OffloadError, Superpacket, ones_sum
from pipeline.region import HEAD, SharedRegion, copy_heads, copy_segments

__all__ = [
    "BLOCK_DESC_DTYPE",
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "FRAME_HDR_DTYPE",
    "PACKET_FANOUT_CBPF",
    "PACKET_FANOUT_CPU",
    "PACKET_FANOUT_HASH",
    "PACKET_FANOUT_LB",
    "PACKET_FANOUT_FLAG_DEFRAG",
    "PACKET_FANOUT_FLAG_UNIQUEID",
    "EspSink",
    "NeighbourCache",
    "RxRing",
    "TxPath",
    "default_fanout_group",
    "suppress_esp_unreachable",
]

# --- linux/if_packet.h, linux/if_ether.h ----------------------------------------------------
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
PACKET_VNET_HDR = 15  # a struct virtio_net_hdr before each frame's MAC header
TPACKET_V2 = 1
TPACKET_V3 = 2

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_LB = 1
PACKET_FANOUT_CPU = 2
PACKET_FANOUT_CBPF = 6  # a classic BPF program picks the member (PACKET_FANOUT_DATA)
PACKET_FANOUT_DATA = 22
PACKET_FANOUT_FLAG_DEFRAG = 0x8000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000  # group id 0: the kernel picks an unused one

PACKET_OUTGOING = 4  # sll_pkttype of a packet this host transmitted

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_CSUMNOTREADY = 0x08  # RX: the L4 checksum is partial (CHECKSUM_PARTIAL)
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_AVAILABLE = 0  # TX ring: frame free for user space
TP_STATUS_SEND_REQUEST = 1  # TX ring: frame filled, kernel to send
TP_STATUS_WRONG_FORMAT = 4  # TX ring: kernel refused the frame

ETH_P_ALL = 0x0003
ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
TPACKET_ALIGNMENT = 16

# struct tpacket_block_desc with its struct tpacket_hdr_v1 (the block header of TPACKET_V3).
BLOCK_DESC_DTYPE = np.dtype(
    [
        ("version", "<u4"),
        ("offset_to_priv", "<u4"),
        ("block_status", "<u4"),  # TP_STATUS_KERNEL / TP_STATUS_USER: who owns the block
        ("num_pkts", "<u4"),
        ("offset_to_first_pkt", "<u4"),
        ("blk_len", "<u4"),
        ("seq_num", "<u8"),
        ("ts_first_sec", "<u4"),
        ("ts_first_nsec", "<u4"),
        ("ts_last_sec", "<u4"),
        ("ts_last_nsec", "<u4"),
    ]
)
# struct tpacket3_hdr followed (at TPACKET_ALIGN(48) = 48) by the first 16 bytes of
# struct sockaddr_ll: 64 bytes, gathered per frame in one fancy-indexing read.
FRAME_HDR_DTYPE = np.dtype(
    [
        ("tp_next_offset", "<u4"),  # to the next frame of the block; 0 for the last
        ("tp_sec", "<u4"),
        ("tp_nsec", "<u4"),
        ("tp_snaplen", "<u4"),  # bytes captured, from the MAC header
        ("tp_len", "<u4"),  # bytes on the wire
        ("tp_status", "<u4"),
        ("tp_mac", "<u2"),  # frame-relative offset of the MAC header
        ("tp_net", "<u2"),  # frame-relative offset of the network header
        ("tp_rxhash", "<u4"),
        ("tp_vlan_tci", "<u4"),
        ("tp_vlan_tpid", "<u2"),
        ("hv1_padding", "<u2"),
        ("tp_padding", "V8"),
        ("sll_family", "<u2"),
        ("sll_protocol", ">u2"),  # ethertype, network order
        ("sll_ifindex", "<i4"),
        ("sll_hatype", "<u2"),
        ("sll_pkttype", "u1"),  # PACKET_HOST, ..., PACKET_OUTGOING
        ("sll_halen", "u1"),
        ("sll_addr_head", "V4"),
    ]
)
# struct tpacket2_hdr followed (at TPACKET_ALIGN(32) = 32) by the first 16 bytes of
# struct sockaddr_ll: the same field names as FRAME_HDR_DTYPE, read the same way.
FRAME_HDR_V2_DTYPE = np.dtype(
    [
        ("tp_status", "<u4"),  # TP_STATUS_KERNEL / TP_STATUS_USER: who owns the frame
        ("tp_len", "<u4"),
        ("tp_snaplen", "<u4"),
        ("tp_mac", "<u2"),
        ("tp_net", "<u2"),
        ("tp_sec", "<u4"),
        ("tp_nsec", "<u4"),
        ("tp_vlan_tci", "<u2"),
        ("tp_vlan_tpid", "<u2"),
        ("tp_padding", "V4"),
        ("sll_family", "<u2"),
        ("sll_protocol", ">u2"),
        ("sll_ifindex", "<i4"),
        ("sll_hatype", "<u2"),
        ("sll_pkttype", "u1"),
        ("sll_halen", "u1"),
        ("sll_addr_head", "V4"),
    ]
)
assert BLOCK_DESC_DTYPE.itemsize == 48 and FRAME_HDR_DTYPE.itemsize == 64
assert FRAME_HDR_V2_DTYPE.itemsize == 48
_RX_DROP_REASONS = ("outgoing", "vlan", "not_ip", "truncated", "too_big")
# The same headers as structs, for a lone frame (RxRing._deliver_one): tp_status, tp_len,
# tp_snaplen, tp_mac, tp_net of TPACKET_V2; tp_snaplen, tp_len, tp_status, tp_mac, tp_net of
# TPACKET_V3 (12 bytes in); then sockaddr_ll's protocol (network order) and pkttype.
_V2_HDR = struct.Struct("<IIIHH")
_V3_HDR = struct.Struct("<IIIHH")
_SLL = struct.Struct(">H6xB")  # sll_protocol, sll_ifindex and sll_hatype skipped, pkttype
_V2_SLL = 32 + 2  # sll_protocol of FRAME_HDR_V2_DTYPE
_V3_SLL = 48 + 2  # sll_protocol of FRAME_HDR_DTYPE
_U16BE = struct.Struct(">H")
assert FRAME_HDR_V2_DTYPE.fields is not None and FRAME_HDR_DTYPE.fields is not None
assert FRAME_HDR_V2_DTYPE.fields["sll_protocol"][1] == _V2_SLL
assert FRAME_HDR_DTYPE.fields["sll_protocol"][1] == _V3_SLL
assert FRAME_HDR_DTYPE.fields["sll_pkttype"][1] == _V3_SLL + _SLL.size - 1
assert FRAME_HDR_V2_DTYPE.fields["sll_pkttype"][1] == _V2_SLL + _SLL.size - 1
assert FRAME_HDR_DTYPE.fields["tp_snaplen"][1] == 12
_V3_ALIGNMENT = 8  # frames in a V3 block start on 8-byte boundaries (TOTAL_PKT_LEN_INCL_ALIGN)

_TPACKET_REQ3 = struct.Struct("=7I")  # block_size, block_nr, frame_size, frame_nr, tov, priv, feat
_TPACKET_REQ = struct.Struct("=4I")
_TPACKET_STATS_V3 = struct.Struct("=3I")  # tp_packets, tp_drops, tp_freeze_q_cnt
_TPACKET_STATS = struct.Struct("=2I")  # tp_packets, tp_drops (TPACKET_V2)

# The IP version nibble gives the ethertype; nothing else may leave through TxPath.
_ETHERTYPE_FOR_VERSION = {4: ETHERTYPE_IPV4, 6: ETHERTYPE_IPV6}
_ETHERTYPE_BYTES = {v: t.to_bytes(2, "big") for v, t in _ETHERTYPE_FOR_VERSION.items()}


def default_fanout_group() -> int:
    """A fanout group id shared by this process group and nobody else's.

    Fanout ids are global per network namespace: two espline instances on one host must not
    join each other's group. The supervisor starts all I/O processes in its process group,
    so they agree on this id without talking to each other.
    """
    return os.getpgrp() & 0xFFFF


class RxRing:
    """A TPACKET_V3 receive ring on one interface, read into batches (``version=2``: a
    TPACKET_V2 ring of fixed frames, each handed over as it arrives rather than in blocks
    retired by ``retire_blk_tov_ms``; the copy into the batch is the same).

    Geometry defaults, and why:

    * ``block_size`` 512 KiB: a block holds about 340 MTU-sized frames, more than a full
      batch of 256, so a batch usually comes from one block and the per-block work (status
      check, hand-back) is amortized. The kernel tries an order-8 allocation per block and falls
      back to vmalloc, so fragmented memory slows the setup rather than failing it.
    * ``block_count`` 64: 32 MiB of ring, about 22 000 MTU frames, 25 ms of 10 GbE line
      rate to absorb a stall of the Python reader.
    * ``retire_blk_tov_ms`` 1 (the smallest): a block is handed to user space when full or
      after this timeout, so at low load this is the latency floor (each ESP packet in
      waits up to 1 ms; 2 ms gave a tunnel ping RTT of ~5 ms through two gateways).
      DESIGN §3's 50 µs batch deadline is not reachable with TPACKET_V3 at low rates:
      packets of a block that is still open are not visible to user space. Each timeout
      closes a block however little it holds, so at low rates the ring holds
      ``block_count * retire_blk_tov_ms`` (64 ms) of traffic, not 32 MiB: a reader
      stalled longer than that loses packets (``kernel_drops``).
    * ``frame_size`` 2048: V3 frames are variable-size; the value only sets the ring's
      nominal ``frame_nr`` (the kernel requires block_size / frame_size * block_count).

    ``vnet_hdr`` (TPACKET_V3 only; the inside ring): each frame carries a virtio-net
    header (PACKET_VNET_HDR), and a GSO frame (a sender's TSO packet passed on by a veth,
    or the interface's GRO; up to 64 KiB) is cut into segments (pipeline/offload.py),
    copied whole into the slots, over as many reads as it takes (:meth:`pending`).

    ``bpf`` is a classic BPF program (:func:`pipeline.bpf.esp_filter` for the outside
    ring); ``None`` captures everything. Outgoing packets (this host's own transmissions)
    are never read: PACKET_IGNORE_OUTGOING, plus a per-frame ``sll_pkttype`` check.
    """

    def __init__(
        self,
        ifname: str,
        *,
        block_size: int = 1 << 19,
        block_count: int = 64,
        frame_size: int = 2048,
        retire_blk_tov_ms: int = 1,
        bpf: Sequence[_bpf.Insn] | None = None,
        fanout_group: int | None = None,
        fanout_mode: int = PACKET_FANOUT_HASH,
        fanout_flags: int = 0,
        version: int = 3,
        vnet_hdr: bool = False,
    ) -> None:
        page = mmap.PAGESIZE
        if version not in (2, 3):
            raise ValueError(f"TPACKET version 2 or 3, got {version}")
        if vnet_hdr and version != 3:
            raise ValueError("vnet_hdr needs TPACKET_V3 (a GSO frame does not fit a V2 frame)")
        self.version = version
        self.vnet_hdr = vnet_hdr
        self.retire_blk_tov_ms = retire_blk_tov_ms
        if block_size % page or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two multiple of {page}")
        if frame_size % TPACKET_ALIGNMENT or not 0 < frame_size <= block_size:
            raise ValueError("frame_size must be a multiple of 16 and at most block_size")
        if block_count <= 0:
            raise ValueError("block_count must be positive")
        self.ifname = ifname
        self.block_size = block_size
        self.block_count = block_count
        self._counters = {
            "packets": 0,  # copied into batches
            "outgoing": 0,  # our own transmissions (only if the kernel did not filter them)
            "vlan": 0,  # tagged frames (the ESP filter already rejects them)
            "not_ip": 0,  # ethertype neither IPv4 nor IPv6, or version nibble mismatch
            "truncated": 0,  # captured shorter than on the wire
            "too_big": 0,  # larger than the batch's slot payload area
            "csum_completed": 0,  # partial TCP/UDP checksums filled in (see read_into)
            "gso": 0,  # GSO/GRO frames cut into segments (vnet_hdr)
            "gso_errors": 0,  # ... that could not be cut (dropped)
            "kernel_packets": 0,  # tp_packets: passed the filter (drops included)
            "kernel_drops": 0,  # tp_drops: ring full
            "kernel_freeze_q_cnt": 0,  # times the ring froze for lack of a free block
        }
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: no packets yet
        mm: mmap.mmap | None = None
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION,
                            TPACKET_V3 if version == 3 else TPACKET_V2)
            with contextlib.suppress(OSError):  # Linux >= 4.20; the pkttype check stays
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            if vnet_hdr:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)  # before the ring
            if bpf is not None:
                _bpf.attach(sock, bpf)  # before bind: no unfiltered packet slips in
            if version == 3:
                req = _TPACKET_REQ3.pack(
                    block_size, block_count, frame_size,
                    (block_size // frame_size) * block_count, retire_blk_tov_ms, 0, 0,
                )  # fmt: skip
            else:
                req = _TPACKET_REQ.pack(block_size, block_count, frame_size,
                                        (block_size // frame_size) * block_count)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            mm = mmap.mmap(
                sock.fileno(), block_size * block_count, mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )  # fmt: skip
            sock.bind((ifname, ETH_P_ALL))
            if fanout_group is not None:
                self._join_fanout(sock, fanout_group, fanout_mode, fanout_flags)
        except BaseException:
            if mm is not None:
                mm.close()
            sock.close()
            raise
        self._mm = mm
        self._sock = sock
        self._ring: npt.NDArray[np.uint8] = np.frombuffer(self._mm, dtype=np.uint8)
        # The ring in 8-byte units: a frame header is 8 consecutive units (frames are
        # 8-byte aligned), so one fancy-index read fetches all headers of a segment.
        self._units: npt.NDArray[np.void] = self._ring.view("V8")
        # One strided structured view over every block header.
        self._blocks: npt.NDArray[np.void] = np.ndarray(
            (block_count,), dtype=BLOCK_DESC_DTYPE, buffer=self._mm, strides=(block_size,)
        )
        self._u32: memoryview = memoryview(self._mm).cast("I")
        self._bytes: memoryview = memoryview(self._mm)
        self._hdr_units = np.arange(FRAME_HDR_DTYPE.itemsize // _V3_ALIGNMENT, dtype=np.int64)
        self._l3_bytes = np.arange(6, dtype=np.int64)
        # TPACKET_V2: fixed frames, back to back (block_size is a multiple of frame_size),
        # each with its own status word: the kernel wakes the reader per packet.
        self.frame_size = frame_size
        self.frame_count = (block_size // frame_size) * block_count
        self._frames: npt.NDArray[np.void] = np.ndarray(
            (self.frame_count,), dtype=FRAME_HDR_V2_DTYPE, buffer=self._mm,
            strides=(frame_size,))
        self._frame = 0  # V2: the next frame to read
        # Heads-only reads (read_heads): batches still out with packets in a block, per
        # block; a block read to its end stays ours (``_kept``) until that count is 0.
        self._holds = [0] * block_count
        self._kept = [False] * block_count
        self._held_by: dict[int, list[int]] = {}  # token -> blocks its batch holds
        self._block = 0  # the block being read (or the next one to wait for)
        self._left = 0  # frames of that block not yet read
        self._pos = 0  # absolute ring offset of its next frame
        self._seq = 0  # seq_num of the last block handed over (the kernel numbers from 1)
        self._pending: Superpacket | None = None  # segments of a GSO frame left to emit
        self._pending_etype = 0
        self._closed = False

    @staticmethod
    def _join_fanout(sock: socket.socket, group: int, mode: int, flags: int) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"fanout group id is 16 bits, got {group}")
        # With fanout the group's hook, not the socket's, decides about outgoing packets.
        arg = group | ((mode | flags | PACKET_FANOUT_FLAG_IGNORE_OUTGOING) << 16)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_FANOUT, arg)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            sock.setsockopt(SOL_PACKET, PACKET_FANOUT, group | ((mode | flags) << 16))

    def fileno(self) -> int:
        return self._sock.fileno()

    def fanout_id(self) -> int:
        """The id of the fanout group this ring joined (the kernel's pick, with
        PACKET_FANOUT_FLAG_UNIQUEID)."""
        return self._sock.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF

    def set_fanout_program(self, program: Sequence[_bpf.Insn]) -> None:
        """Replace the steering program of this ring's PACKET_FANOUT_CBPF group (every
        member's). The kernel returns once no packet is being steered by the old program
        any more (an RCU grace period, a few ms): every packet it sent to a member is in
        that member's ring. Other threads run meanwhile (the GIL is released)."""
        _bpf.set_program(self._sock, SOL_PACKET, PACKET_FANOUT_DATA, program, release_gil=True)

    def set_filter(self, program: Sequence[_bpf.Insn]) -> None:
        """Replace the ring's socket filter (:func:`pipeline.bpf.attach`)."""
        _bpf.attach(self._sock, program)

    def drained(self) -> bool:
        """Whether nothing is left for :meth:`read_into` to hand over, counting packets the
        kernel holds in a TPACKET_V3 block it has not retired yet (these become readable
        within about the block timeout). Meant for a ring that gets no new packets (its
        fanout group steers elsewhere); a fed ring is never drained for long."""
        if self._pending is not None:
            return False
        if self.version == 2:
            return not self._u32[self._frame * self.frame_size >> 2] & TP_STATUS_USER
        if self._left:
            return False
        b = self._block
        if self._kept[b]:
            return True  # a whole ring of blocks out at workers: the kernel holds nothing
        blocks = self._blocks
        if int(blocks["block_status"][b]) & TP_STATUS_USER:
            return False
        # The block the kernel fills next, or is filling. One it opened since the last
        # handover carries the next sequence number; one it has not opened (the ring was
        # full, or it is still ours from the last round) holds last round's header.
        return int(blocks["seq_num"][b]) != self._seq + 1 or not int(blocks["num_pkts"][b])

    def pending(self) -> bool:
        """Segments of a GSO frame already read wait for the next read (``vnet_hdr``)."""
        return self._pending is not None

    def readable(self) -> bool:
        """True if :meth:`read_into` has something to read now."""
        if self._pending is not None:
            return True
        if self.version == 2:
            return bool(int(self._frames["tp_status"][self._frame]) & TP_STATUS_USER)
        if self._left:
            return True
        return bool(int(self._blocks["block_status"][self._block]) & TP_STATUS_USER)

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds for a block; True if one is ready."""
        if self.readable():
            return True
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN | select.POLLERR)
        poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
        return self.readable()

    def _open_block(self) -> bool:
        blocks = self._blocks
        b = self._block
        # A block still kept for a batch out at a worker is not new: the kernel cannot
        # have filled it again, since it is not the kernel's.
        while not self._kept[b] and int(blocks["block_status"][b]) & TP_STATUS_USER:
            self._seq = int(blocks["seq_num"][b])
            num = int(blocks["num_pkts"][b])
            if num:
                self._left = num
                self._pos = b * self.block_size + int(blocks["offset_to_first_pkt"][b])
                return True
            self._release_block()
            b = self._block
        return False

    def _release_block(self) -> None:
        # Hand the block back only once every frame in it is copied out, and no batch of
        # packet heads still points into it.
        b = self._block
        if self._holds[b]:
            self._kept[b] = True
        else:
            self._blocks["block_status"][b] = TP_STATUS_KERNEL
        self._block = (b + 1) % self.block_count

    def shared_region(self) -> SharedRegion | None:
        """The ring as memory other processes map (pipeline/region.py): the socket's
        descriptor maps the same pages there. None for TPACKET_V2, read by copy only."""
        if self.version != 3:
            return None
        return SharedRegion(self._sock.fileno(), self.block_size * self.block_count,
                            self._ring)

    def read_heads(self, batch: Batch, max_packets: int | None, region: int, token: int,
                   ethertypes: npt.NDArray[np.uint16] | None = None, *,
                   head: int = HEAD) -> int:
        """:meth:`read_into`, but the slots get each packet's first ``head`` bytes (HEAD,
        or 0: none) and ``batch.src`` its offset in the ring (pipeline/region.py);
        ``batch.region`` is set to ``region`` if any packet was read so. The blocks those
        packets lie in stay out of the kernel's hands until :meth:`release` with
        ``token``. A lone frame is copied whole (``src`` -1), as are all frames of a
        TPACKET_V2 ring."""
        if self.version != 3:
            return self.read_into(batch, max_packets, ethertypes)
        start = batch.count
        n = self._read(batch, max_packets, ethertypes, (token, head))
        if n and int(batch.src[start : start + n].max()) >= 0:
            batch.region = region
        return n

    def release(self, token: int) -> None:
        """The batch read with ``token`` is done with the ring: its blocks go back to the
        kernel once no other batch holds them and they are read to their end."""
        for b in self._held_by.pop(token, ()):
            self._holds[b] -= 1
            if not self._holds[b] and self._kept[b]:
                self._kept[b] = False
                self._blocks["block_status"][b] = TP_STATUS_KERNEL

    def held_blocks(self) -> int:
        """Blocks kept for batches of packet heads not yet released."""
        return sum(1 for h in self._holds if h)

    def read_into(
        self,
        batch: Batch,
        max_packets: int | None = None,
        ethertypes: npt.NDArray[np.uint16] | None = None,
    ) -> int:
        """Append up to ``max_packets`` ready packets to ``batch``; return how many.

        Packets go into slots ``batch.count``, ``batch.count + 1``, ... each at the slot's
        ``HEADROOM``, L3 only (the Ethernet header is stripped; Ethernet padding of short
        frames is trimmed using the IP length). Metadata is reset (sa 0, verdict PASS, seq 0,
        flags 0).

        A packet that a local sender handed over with its TCP/UDP checksum left to the
        hardware (CHECKSUM_PARTIAL: frames from a veth peer or a tap, flagged
        TP_STATUS_CSUMNOTREADY) carries only the pseudo-header sum there; its checksum is
        completed here, since the packet leaves through a tunnel that will not finish it.
        If ``ethertypes`` is given (one uint16 per slot) it receives each packet's
        ethertype; the IP version nibble says the same, because frames whose ethertype and
        version disagree are dropped here. Never blocks; a block left half read is resumed
        on the next call.
        """
        if self.version == 2:
            room = batch.capacity - batch.count
            return self._read_v2(batch, room if max_packets is None else min(room, max_packets),
                                 ethertypes)
        return self._read(batch, max_packets, ethertypes, None)

    def _read(self, batch: Batch, max_packets: int | None,
              ethertypes: npt.NDArray[np.uint16] | None,
              heads: tuple[int, int] | None) -> int:
        """TPACKET_V3: ``read_into``, or with ``heads`` (token, head) ``read_heads``."""
        start = batch.count
        room = batch.capacity - start
        if max_packets is not None:
            room = min(room, max_packets)
        u32 = self._u32
        filled = 0
        while filled < room:
            if self._pending is not None:
                filled += self._emit(batch, start + filled, room - filled, ethertypes)
                continue
            if not self._left and not self._open_block():
                break
            take = min(self._left, room - filled)
            pos = self._pos
            gso = self.vnet_hdr and self._gso_at(pos)
            if gso or take == 1:  # a GSO frame, or a lone frame (sparse traffic): no numpy
                self._pos = pos + u32[pos >> 2]
                if gso:  # the sender's TSO or the interface's GRO: cut into segments,
                    self._cut(pos, batch.max_packet)  # copied whole into the slots
                else:
                    filled += self._deliver_one(batch, start + filled, pos, ethertypes)
                self._left -= 1
                if not self._left:
                    self._release_block()
                continue
            offsets = [0] * take
            for i in range(take):  # the frame list is linked by tp_next_offset
                if i and self.vnet_hdr and self._gso_at(pos):
                    take = i  # up to the GSO frame: cut at the next turn
                    del offsets[i:]
                    break
                offsets[i] = pos
                pos += u32[pos >> 2]
            self._pos = pos
            offs = np.array(offsets, dtype=np.int64)
            hdr = self._units[(offs >> 3)[:, None] + self._hdr_units].reshape(-1)
            got = self._deliver(batch, start + filled, offs, hdr.view(FRAME_HDR_DTYPE),
                                ethertypes, None if heads is None else heads[1])
            if got and heads is not None:
                blocks = self._held_by.setdefault(heads[0], [])
                if self._block not in blocks:
                    blocks.append(self._block)
                    self._holds[self._block] += 1
            filled += got
            self._left -= take
            if not self._left:
                self._release_block()
        batch.count = start + filled
        self._counters["packets"] += filled
        return filled

    def _gso_at(self, pos: int) -> bool:
        """Whether the V3 frame at ring offset ``pos`` is a GSO frame (its virtio-net
        header, just before the MAC header, names a GSO type)."""
        mac = self._bytes[pos + 24] | self._bytes[pos + 25] << 8  # tp_mac
        return bool(self._bytes[pos + mac - VNET_HDR_LEN + 1])

    def _cut(self, pos: int, room: int) -> None:
        """Take the GSO frame at ring offset ``pos`` as segments to emit (``_pending``), or
        count it as a drop."""
        reason, l3, cap, _, etype, _, mac = self._check_frame(pos)
        if reason is None:
            _, gso_type, _, gso_size, _, _ = VNET_HDR.unpack_from(self._bytes,
                                                                  pos + mac - VNET_HDR_LEN)
            try:
                self._pending = Superpacket.parse(self._ring[l3 : l3 + cap].copy(), gso_type,
                                                  gso_size, room)
            except OffloadError:
                reason = "gso_errors"
            else:
                self._pending_etype = etype
                self._counters["gso"] += 1
                return
        self._counters[reason] += 1

    def _emit(self, batch: Batch, first: int, room: int,
              ethertypes: npt.NDArray[np.uint16] | None) -> int:
        """The next segments of the pending GSO frame into slots ``first``, ... (whole:
        ``src`` -1); how many."""
        sp = self._pending
        assert sp is not None
        lengths = sp.emit(batch.data, first * batch.slot_size + HEADROOM, batch.slot_size, room)
        k = len(lengths)
        if not sp.remaining:
            self._pending = None
        sl = slice(first, first + k)
        meta = batch.meta
        meta[sl] = 0
        meta["offset"][sl] = batch.slot_starts()[sl] + HEADROOM
        meta["length"][sl] = lengths
        batch.src[sl] = -1
        if ethertypes is not None:
            ethertypes[sl] = self._pending_etype
        return k

    def _read_v2(self, batch: Batch, room: int,
                 ethertypes: npt.NDArray[np.uint16] | None) -> int:
        """TPACKET_V2: the run of user-owned frames from the cursor, in ring order."""
        start = batch.count
        u32, frame, fs = self._u32, self._frame, self.frame_size
        if u32[frame * fs >> 2] & TP_STATUS_USER and (
                room == 1 or not u32[(frame + 1) % self.frame_count * fs >> 2] & TP_STATUS_USER):
            # A lone frame (sparse traffic): no numpy.
            filled = self._deliver_one(batch, start, frame * fs, ethertypes)
            u32[frame * fs >> 2] = TP_STATUS_KERNEL  # copied out: the kernel's again
            self._frame = (frame + 1) % self.frame_count
        else:
            idx = (frame + np.arange(room, dtype=np.int64)) % self.frame_count
            ready = (self._frames["tp_status"][idx] & TP_STATUS_USER) != 0
            take = room if ready.all() else int(np.argmin(ready))
            if not take:
                return 0
            idx = idx[:take]
            filled = self._deliver(batch, start, idx * fs, self._frames[idx], ethertypes)
            self._frames["tp_status"][idx] = TP_STATUS_KERNEL  # copied out: the kernel's again
            self._frame = int(idx[-1] + 1) % self.frame_count
        batch.count = start + filled
        self._counters["packets"] += filled
        return filled

    def _check_frame(self, off: int) -> tuple[str | None, int, int, int, int, int, int]:
        """The frame at ring offset ``off``, in plain Python: the first reason it is not
        ours (as in ``_deliver``, before ``too_big``) or None, its L3 offset, bytes captured
        from there, IP length (Ethernet padding trimmed), ethertype, tp_status and tp_mac."""
        mem = self._bytes
        if self.version == 2:
            status, wire_len, snaplen, mac, net = _V2_HDR.unpack_from(mem, off)
            etype, pkttype = _SLL.unpack_from(mem, off + _V2_SLL)
        else:
            snaplen, wire_len, status, mac, net = _V3_HDR.unpack_from(mem, off + 12)
            etype, pkttype = _SLL.unpack_from(mem, off + _V3_SLL)
        l3 = off + net
        cap = snaplen - (net - mac)
        b0 = mem[l3]
        is4 = etype == ETHERTYPE_IPV4 and b0 >> 4 == 4
        is6 = etype == ETHERTYPE_IPV6 and b0 >> 4 == 6
        ip_len = (_U16BE.unpack_from(mem, l3 + 2)[0] if is4
                  else 40 + _U16BE.unpack_from(mem, l3 + 4)[0])
        length = ip_len if 0 < ip_len <= cap else cap
        reason = None
        if pkttype == PACKET_OUTGOING:
            reason = "outgoing"
        elif status & TP_STATUS_VLAN_VALID:
            reason = "vlan"
        elif not (is4 or is6):
            reason = "not_ip"
        elif wire_len != snaplen:
            reason = "truncated"
        return reason, l3, cap, length, etype, status, mac

    def _deliver_one(self, batch: Batch, slot: int, off: int,
                     ethertypes: npt.NDArray[np.uint16] | None) -> int:
        """``_deliver`` for the one frame at ring offset ``off``, in plain Python: the same
        checks in the same order, the same counters (tests/test_afpacket.py reads frames
        both ways)."""
        reason, l3, _, length, etype, status, _ = self._check_frame(off)
        if reason is None and length > batch.max_packet:
            reason = "too_big"
        if reason is None:
            base = slot * batch.slot_size + HEADROOM
            batch.memory()[0][base : base + length] = self._bytes[l3 : l3 + length]
            batch.set_row(slot, base, length)
            batch.src[slot] = -1  # whole in its slot (a batch may also hold packet heads)
            if ethertypes is not None:
                ethertypes[slot] = etype
            if status & TP_STATUS_CSUMNOTREADY and complete_l4_checksum(batch.data, base,
                                                                         length):
                self._counters["csum_completed"] += 1
            return 1
        self._counters[reason] += 1
        return 0

    def _deliver(self, batch: Batch, first: int, offs: npt.NDArray[np.int64],
                 hdr: npt.NDArray[np.void], ethertypes: npt.NDArray[np.uint16] | None,
                 head: int | None = None) -> int:
        """Copy the frames at ring offsets ``offs`` (headers ``hdr``) into slots ``first``,
        ``first + 1``, ... (``head``: only their first ``head`` bytes, pipeline/region.py);
        frames that are not ours are counted by reason and skipped. Returns how many slots
        were filled."""
        max_len = batch.max_packet
        meta = batch.meta
        counters = self._counters
        l3 = offs + hdr["tp_net"]
        cap = hdr["tp_snaplen"].astype(np.int64) - (hdr["tp_net"] - hdr["tp_mac"])
        ip = self._ring[l3[:, None] + self._l3_bytes].astype(np.int64)
        version = ip[:, 0] >> 4
        etype = hdr["sll_protocol"]
        is4 = (etype == ETHERTYPE_IPV4) & (version == 4)
        is6 = (etype == ETHERTYPE_IPV6) & (version == 6)
        # Trim Ethernet padding: a frame is padded to 60 bytes, an IP packet is not.
        ip_len = np.where(is4, (ip[:, 2] << 8) | ip[:, 3], 40 + ((ip[:, 4] << 8) | ip[:, 5]))
        length = np.where((ip_len <= cap) & (ip_len > 0), ip_len, cap)
        outgoing = hdr["sll_pkttype"] == PACKET_OUTGOING
        vlan = (hdr["tp_status"] & TP_STATUS_VLAN_VALID) != 0
        not_ip = ~(is4 | is6)
        truncated = hdr["tp_len"] != hdr["tp_snaplen"]
        too_big = length > max_len
        # The first reason that applies is the one counted.
        reason = np.select([outgoing, vlan, not_ip, truncated, too_big], [1, 2, 3, 4, 5], 0)
        if reason.any():
            counts = np.bincount(reason, minlength=6).tolist()
            for name, c in zip(_RX_DROP_REASONS, counts[1:], strict=True):
                counters[name] += c
            good = np.flatnonzero(reason == 0)
            l3, length, etype = l3[good], length[good], etype[good]
            hdr = hdr[good]
        k = len(length)
        if k:
            # Partial checksums (only from local senders: veth, tap) are completed in the
            # ring, before anything is copied out of it: a worker may copy from there.
            for j in np.flatnonzero(hdr["tp_status"] & TP_STATUS_CSUMNOTREADY).tolist():
                if complete_l4_checksum(self._ring, int(l3[j]), int(length[j])):
                    counters["csum_completed"] += 1
            sl = slice(first, first + k)
            if head is not None:
                copy_heads(batch, first, self._ring, l3, length, head)
            else:
                offset = batch.slot_starts()[sl] + HEADROOM
                copy_segments(batch.data, offset, self._ring, l3, length)
                meta["offset"][sl] = offset
                meta["length"][sl] = length
                batch.src[sl] = -1  # whole in their slots (the batch may hold heads too)
            meta["sa"][sl] = 0
            meta["verdict"][sl] = 0
            meta["flags"][sl] = 0
            meta["seq"][sl] = 0
            if ethertypes is not None:
                ethertypes[sl] = etype
        return k

    def stats(self) -> dict[str, int]:
        """Counters since the ring was opened; the kernel's are read (and reset) here."""
        if self.version == 2:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
            (packets, drops), freeze = _TPACKET_STATS.unpack(raw), 0
        else:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS_V3.size)
            packets, drops, freeze = _TPACKET_STATS_V3.unpack(raw)
        self._counters["kernel_packets"] += packets  # tp_packets already includes tp_drops
        self._counters["kernel_drops"] += drops
        self._counters["kernel_freeze_q_cnt"] += freeze
        return dict(self._counters)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Views of the mapping must go before the mapping can be unmapped.
        self._u32.release()
        self._bytes.release()
        del self._ring, self._units, self._blocks, self._frames
        with contextlib.suppress(BufferError):  # a caller still holds a view: the GC unmaps it
            self._mm.close()
        self._sock.close()

    def __enter__(self) -> RxRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def complete_l4_checksum(buf: npt.NDArray[np.uint8], off: int, length: int) -> bool:
    """Compute the TCP or UDP checksum (RFC 9293 §3.1, RFC 768; RFC 8200 §8.1 for IPv6) of
    the packet at ``buf[off : off + length]`` from scratch, in place. The sender left it
    partial (CHECKSUM_PARTIAL). Returns False, leaving the packet as it is, for what this
    does not handle: fragments, other protocols, IPv6 extension headers."""
    pkt = buf[off : off + length]
    if length < 20:
        return False
    version = int(pkt[0]) >> 4
    if version == 4:
        ihl = (int(pkt[0]) & 0xF) * 4
        if ihl < 20 or length < ihl or (int(pkt[6]) & 0x3F) or int(pkt[7]):
            return False  # a fragment (MF or an offset): its checksum is whole already
        proto, l4 = int(pkt[9]), ihl
        pseudo = ones_sum(pkt[12:20])
    elif version == 6 and length >= 40:
        proto, l4 = int(pkt[6]), 40
        pseudo = ones_sum(pkt[8:40])
    else:
        return False
    at = {6: 16, 17: 6}.get(proto)  # the checksum's offset in the TCP / UDP header
    if at is None or length < l4 + at + 2:
        return False
    seg = pkt[l4:length]
    seg[at] = seg[at + 1] = 0
    csum = 0xFFFF - ones_sum(seg, pseudo + proto + len(seg))
    if proto == 17 and csum == 0:
        csum = 0xFFFF  # RFC 768: zero means "no checksum"
    seg[at], seg[at + 1] = csum >> 8, csum & 0xFF
    return True


# --- transmit -------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg: Any = getattr(_libc, "sendmmsg", None)
if _sendmmsg is not None:
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _sendmmsg.restype = ctypes.c_int
# struct mmsghdr on LP64 Linux: msghdr is 7 words (name, namelen, iov, iovlen, control,
# controllen, flags) and msg_len pads it to 8. Each message has one iovec (base, len).
_MMSG_WORDS = 8
_MMSG_IOV, _MMSG_IOVLEN = 2, 3
_LP64 = struct.calcsize("P") == 8
_TPACKET2_DATA = 32  # TPACKET2_HDRLEN (52) - sizeof(struct sockaddr_ll) (20)

TxMethod = Literal["sendmmsg", "ring", "sendmsg"]


class TxPath:
    """Send a batch's passing packets (verdict 0, L3) out of ``ifname``.

    Each packet's Ethernet header comes from :class:`NeighbourCache`; packets without a
    next hop are dropped and counted (``no_route``, ``no_neighbour``), as are packets that
    are neither IPv4 nor IPv6 (``bad_version``) or exceed the MTU (``too_big``). Verdicts in
    the batch are left as they are.

    ``method`` (see the module docstring for the measurements): ``"sendmmsg"`` writes the
    Ethernet header into each packet's headroom (the 14 bytes in front of ``offset``) and
    sends the whole batch with one ``sendmmsg``; ``"ring"`` copies into a TPACKET_V2 TX ring
    and kicks it with one ``send``; ``"sendmsg"`` is one syscall per packet.
    ``qdisc_bypass`` sets PACKET_QDISC_BYPASS (no traffic control, no qdisc backpressure).
    """

    def __init__(
        self,
        ifname: str,
        *,
        method: TxMethod = "sendmmsg",
        neighbour_ttl: float = 1.0,
        qdisc_bypass: bool = False,
        ring_frames: int = 1024,
        iproute: Any = None,
    ) -> None:
        if method == "sendmmsg" and (_sendmmsg is None or not _LP64):
            method = "sendmsg"
        self.method: TxMethod = method
        self.neighbours = NeighbourCache(ifname, ttl=neighbour_ttl, iproute=iproute)
        self.mtu = self.neighbours.mtu
        self._counters = {
            "packets": 0,
            "bytes": 0,
            "no_route": 0,
            "no_neighbour": 0,
            "bad_version": 0,
            "too_big": 0,
            "no_headroom": 0,
            "tx_error": 0,  # refused by the kernel (ENOBUFS from a full qdisc, ...)
            "ring_full": 0,
        }
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing
        self._ring: npt.NDArray[np.uint8] | None = None
        self._mm: mmap.mmap | None = None
        try:
            if qdisc_bypass:
                sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            if method == "ring":
                self._setup_ring(sock, ring_frames)
            sock.bind((ifname, 0))
        except BaseException:
            sock.close()
            self.neighbours.close()
            raise
        self._sock = sock
        self._iov = np.zeros((0, 2), dtype=np.uint64)
        self._mmsg = np.zeros((0, _MMSG_WORDS), dtype=np.uint64)
        self._eth_cols = np.arange(ETH_HLEN, dtype=np.int64)

    def _setup_ring(self, sock: socket.socket, frames: int) -> None:
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)  # skip, don't stall on, a refused frame
        need = _TPACKET2_DATA + ETH_HLEN + self.mtu
        frame_size = 1 << max(11, (need - 1).bit_length())
        block_size = max(frame_size, 1 << 16)
        per_block = block_size // frame_size
        blocks = -(-frames // per_block)
        sock.setsockopt(
            SOL_PACKET, PACKET_TX_RING,
            _TPACKET_REQ.pack(block_size, blocks, frame_size, blocks * per_block),
        )  # fmt: skip
        self._mm = mmap.mmap(
            sock.fileno(), block_size * blocks, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._ring = np.frombuffer(self._mm, dtype=np.uint8)
        self._ring_u32 = self._ring.view("<u4")
        self._ring_bytes = memoryview(self._mm)
        self._frame_size = frame_size
        self._frame_count = blocks * per_block
        self._head = 0

    def _headers(
        self, data: npt.NDArray[np.uint8], offs: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """(one 14-byte Ethernet header per distinct next hop, per-packet row or -1).

        Destinations are grouped first (a batch usually goes to a handful of peers), so the
        neighbour cache is asked once per distinct address, not once per packet.
        """
        rows = np.full(len(offs), -1, dtype=np.int64)
        table: list[bytes] = []
        version = data[offs] >> 4
        counters = self._counters
        for ver, family, at, size in ((4, socket.AF_INET, 16, 4), (6, socket.AF_INET6, 24, 16)):
            sel = np.flatnonzero(version == ver)
            if not len(sel):
                continue
            addrs = data[(offs[sel] + at)[:, None] + np.arange(size)]
            if (addrs == addrs[0]).all():  # the common case: one peer
                uniq, inverse = addrs[:1], np.zeros(len(sel), dtype=np.int64)
            elif size == 4:
                keys, inverse = np.unique(addrs.view(">u4").reshape(-1), return_inverse=True)
                uniq = keys.astype(">u4").view(np.uint8).reshape(-1, 4)
            else:
                uniq, inverse = np.unique(addrs, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            ethertype = _ETHERTYPE_FOR_VERSION[ver].to_bytes(2, "big")
            row_of = np.full(len(uniq), -1, dtype=np.int64)
            misses: dict[str, list[int]] = {}
            for j in range(len(uniq)):
                mac, reason = self.neighbours.lookup(family, uniq[j].tobytes())
                if mac is None:
                    misses.setdefault(reason, []).append(j)
                    continue
                row_of[j] = len(table)
                table.append(mac + self.neighbours.mac + ethertype)
            rows[sel] = row_of[inverse]
            if misses:
                per_dst = np.bincount(inverse, minlength=len(uniq))
                for reason, js in misses.items():
                    counters[reason] += int(per_dst[js].sum())
        counters["bad_version"] += int(((version != 4) & (version != 6)).sum())
        hdrs = np.frombuffer(b"".join(table), dtype=np.uint8).reshape(-1, ETH_HLEN)
        return hdrs, rows

    def send(self, batch: Batch) -> int:
        """Transmit the batch's passing packets; return how many the kernel accepted."""
        n = batch.count
        if n == 1 and self.method != "ring":
            return self._send_one(batch)
        meta = batch.meta
        sel = np.flatnonzero(meta["verdict"][:n] == 0)
        if not len(sel):
            return 0
        offs = meta["offset"][sel].astype(np.int64)
        lens = meta["length"][sel].astype(np.int64)
        data = batch.data
        hdrs, rows = self._headers(data, offs)
        big = lens > self.mtu
        if big.any():
            self._counters["too_big"] += int((big & (rows >= 0)).sum())
            rows[big] = -1
        ok = np.flatnonzero(rows >= 0)
        if len(ok) != len(offs):
            offs, lens, rows = offs[ok], lens[ok], rows[ok]
        if not len(offs):
            return 0
        if self.method == "ring":
            sent = self._send_ring(batch, offs, lens, hdrs[rows])
        else:
            sent = self._send_headroom(batch, offs, lens, hdrs[rows])
        return sent

    def _send_one(self, batch: Batch) -> int:
        """``send`` for a batch of one packet, in plain Python (sparse traffic): the same
        checks in the same order, the same counters."""
        off, length, _, verdict, *_ = batch.row(0)
        if verdict:
            return 0
        data = batch.memory()[0]
        version = data[off] >> 4
        if version == 4:
            family, addr = socket.AF_INET, data[off + 16 : off + 20]
        elif version == 6:
            family, addr = socket.AF_INET6, data[off + 24 : off + 40]
        else:
            self._counters["bad_version"] += 1
            return 0
        mac, reason = self.neighbours.lookup(family, addr.tobytes())
        if mac is None:
            self._counters[reason] += 1
            return 0
        if length > self.mtu:
            self._counters["too_big"] += 1
            return 0
        start = off - ETH_HLEN
        if start < off - off % batch.slot_size:
            self._counters["no_headroom"] += 1
            return 0
        data[start:off] = mac + self.neighbours.mac + _ETHERTYPE_BYTES[version]
        try:
            self._sock.send(data[start : off + length])
        except OSError:
            self._counters["tx_error"] += 1
            return 0
        self._counters["packets"] += 1
        self._counters["bytes"] += length + ETH_HLEN
        return 1

    def _send_headroom(
        self,
        batch: Batch,
        offs: npt.NDArray[np.int64],
        lens: npt.NDArray[np.int64],
        eth: npt.NDArray[np.uint8],
    ) -> int:
        start = offs - ETH_HLEN
        fits = start >= (offs // batch.slot_size) * batch.slot_size
        if not fits.all():
            self._counters["no_headroom"] += int((~fits).sum())
            start, lens, eth = start[fits], lens[fits], eth[fits]
        data = batch.data
        data[start[:, None] + self._eth_cols] = eth
        frame_lens = lens + ETH_HLEN
        count = len(start)
        if self.method == "sendmsg":
            view = data.data
            sent = 0
            for s, m in zip(start.tolist(), frame_lens.tolist(), strict=True):
                try:
                    self._sock.send(view[s : s + m])
                    sent += 1
                    self._counters["bytes"] += m
                except OSError:
                    self._counters["tx_error"] += 1
            self._counters["packets"] += sent
            return sent
        if len(self._iov) < count:
            cap = max(count, 256)
            self._iov = np.zeros((cap, 2), dtype=np.uint64)
            self._mmsg = np.zeros((cap, _MMSG_WORDS), dtype=np.uint64)
            iov_base = self._iov.ctypes.data
            self._mmsg[:, _MMSG_IOV] = iov_base + 16 * np.arange(cap, dtype=np.uint64)
            self._mmsg[:, _MMSG_IOVLEN] = 1
        self._iov[:count, 0] = data.ctypes.data + start.astype(np.uint64)
        self._iov[:count, 1] = frame_lens.astype(np.uint64)
        base = self._mmsg.ctypes.data
        fd = self._sock.fileno()
        done = failed = failed_bytes = 0
        while done < count:
            r = int(_sendmmsg(fd, base + done * _MMSG_WORDS * 8, count - done, 0))
            if r < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                # sendmmsg reports an error only for the first message of the call: skip it.
                failed += 1
                failed_bytes += int(frame_lens[done])
                done += 1
                continue
            done += r
        sent = count - failed
        self._counters["tx_error"] += failed
        self._counters["packets"] += sent
        self._counters["bytes"] += int(frame_lens.sum()) - failed_bytes
        return sent

    def _send_ring(
        self,
        batch: Batch,
        offs: npt.NDArray[np.int64],
        lens: npt.NDArray[np.int64],
        eth: npt.NDArray[np.uint8],
    ) -> int:
        sent = 0
        step = self._frame_count
        for i in range(0, len(offs), step):  # a batch larger than the ring goes in chunks
            part = slice(i, i + step)
            sent += self._fill_ring(batch, offs[part], lens[part], eth[part])
        return sent

    def _fill_ring(
        self,
        batch: Batch,
        offs: npt.NDArray[np.int64],
        lens: npt.NDArray[np.int64],
        eth: npt.NDArray[np.uint8],
    ) -> int:
        assert self._ring is not None
        count = len(offs)
        fs, total = self._frame_size, self._frame_count
        frame = ((self._head + np.arange(count, dtype=np.int64)) % total) * fs
        status = self._ring_u32[frame >> 2]
        if (status & ~np.uint32(TP_STATUS_WRONG_FORMAT)).any():
            self._flush()  # frames still in flight: let the kernel finish them
            status = self._ring_u32[frame >> 2]
        # PACKET_LOSS: a frame the kernel refused is marked, skipped, and free again.
        self._counters["tx_error"] += int(((status & TP_STATUS_WRONG_FORMAT) != 0).sum())
        busy = np.flatnonzero((status & ~np.uint32(TP_STATUS_WRONG_FORMAT)) != 0)
        if len(busy):  # frames are used in order: stop at the first busy one
            usable = int(busy[0])
            self._counters["ring_full"] += count - usable
            count = usable
            frame, offs, lens, eth = frame[:count], offs[:count], lens[:count], eth[:count]
            if not count:
                return 0
        self._ring[(frame + _TPACKET2_DATA)[:, None] + self._eth_cols] = eth
        dst = self._ring_bytes
        src = batch.data.data
        at = _TPACKET2_DATA + ETH_HLEN
        for f, o, m in zip(frame.tolist(), offs.tolist(), lens.tolist(), strict=True):
            dst[f + at : f + at + m] = src[o : o + m]
        frame_lens = lens + ETH_HLEN
        self._ring_u32[(frame >> 2) + 1] = frame_lens  # tp_len
        self._ring_u32[frame >> 2] = TP_STATUS_SEND_REQUEST  # last: hands the frame over
        self._head = (self._head + count) % total
        self._flush()
        self._counters["packets"] += count
        self._counters["bytes"] += int(frame_lens.sum())
        return count

    def _flush(self) -> None:
        try:
            self._sock.send(b"")  # blocking: returns once every requested frame is sent
        except OSError:
            self._counters["tx_error"] += 1

    def stats(self) -> dict[str, int]:
        """The counters, and the rtnetlink requests next-hop resolution made (what a
        resolution costs shows there: pipeline/neighbours.py)."""
        return dict(self._counters, neighbour_requests=self.neighbours.requests)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
        if self._mm is not None:
            self._ring_bytes.release()
            self._ring = None
            del self._ring_u32
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
        self.neighbours.close()

    def __enter__(self) -> TxPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- keeping the kernel quiet ---------------------------------------------------------------
class EspSink:
    """Raw ``IPPROTO_ESP`` sockets that make the kernel consider ESP delivered.

    Keep it open for as long as the data plane owns ESP in this network namespace.
    """

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []

    def __enter__(self) -> EspSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def suppress_esp_unreachable(*, ipv4: bool = True, ipv6: bool = True) -> EspSink:
    """Stop this network namespace from answering ESP with ICMP; returns what must stay open.

    Linux without an ESP handler answers each ESP packet with ICMP protocol unreachable
    (IPv4) or a parameter problem (IPv6) after AF_PACKET has copied it. A raw socket for
    protocol 50 counts as a receiver (``raw_local_deliver`` returns true, so
    ``ip_protocol_deliver_rcu`` sends no ICMP); its filter then drops each clone before it
    is queued. Needs CAP_NET_RAW only, unlike an nftables ``meta l4proto esp drop`` rule in
    the input hook, which does the same job with CAP_NET_ADMIN and the ``nft`` tool. Call it
    in the namespace of the outside interface (sockets belong to the namespace they were
    created in).
    """
    socks: list[socket.socket] = []
    try:
        for wanted, family in ((ipv4, socket.AF_INET), (ipv6, socket.AF_INET6)):
            if not wanted:
                continue
            s = socket.socket(family, socket.SOCK_RAW, _bpf.IPPROTO_ESP)
            socks.append(s)
            _bpf.attach(s, _bpf.REJECT_ALL)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return EspSink(socks)
