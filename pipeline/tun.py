"""The TUN inside interface of the routed data plane (DESIGN §7).

Remote subnets are routed into a TUN device; the I/O process reads the plaintext packets the
kernel routes there into the slots of a :class:`~pipeline.batch.Batch` and writes decapsulated
packets back, one syscall per packet (TUN offers no batched read), with no per-packet Python
object beyond the ``int`` that ``os.readv`` returns. With offloads (``IFF_VNET_HDR`` and
TSO, pipeline/offload.py) one read may bring a TCP packet of up to 64 KiB, cut here into
segments over many slots, and one write may carry many segments of one connection.

Everything here happens in the network namespace of the calling process: the device, its
address and its routes (set with pyroute2). ``IFF_MULTI_QUEUE`` gives one fd per reader;
another process can attach its own queue to an existing device with :meth:`TunQueue.attach`.

The device is not persistent: it disappears when its last queue fd closes, taking its address
and routes with it. :meth:`TunDevice.close` still removes the routes it added first, so that a
device shared with other attached queues leaves no route behind.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Iterable
from types import TracebackType

import numpy as np
import numpy.typing as npt
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pipeline import offload
from pipeline.batch import HEADROOM, Batch, Verdict
from pipeline.offload import F_NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN, OffloadError, Superpacket
from pipeline.rtnl import RouteSocket

__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TUN",
    "TUN_PATH",
    "TunDevice",
    "TunError",
    "TunQueue",
]

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix: reads and writes are bare IP packets
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000  # every read and write starts with a struct virtio_net_hdr
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01  # the kernel may hand over packets with partial checksums
TUN_F_TSO4 = 0x02  # ... and TCP packets of up to 64 KiB, to cut into segments here
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20  # ... and UDP packets a sender's UDP_SEGMENT made (Linux >= 6.2)
TUN_F_USO6 = 0x40
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
IFNAMSIZ = 16
# struct ifreq: char ifr_name[IFNAMSIZ]; then a union whose largest member (struct ifmap)
# makes the whole struct 40 bytes on 64-bit Linux; ifr_flags is a short at its start.
_IFREQ = struct.Struct("16sH22x")

_CAP_HINT = (
    "creating a TUN device needs CAP_NET_ADMIN in the network namespace "
    "(run as root, or grant NET_ADMIN to the container / setcap cap_net_admin+ep)"
)
_MISSING_HINT = (
    f"{TUN_PATH} is missing: load the tun kernel module (modprobe tun) or, in a container, "
    f"pass the device in (docker --device {TUN_PATH}; Kubernetes: mount it from the host)"
)

# Key of this module's per-slot view cache in Batch._views (see pipeline/batch.py).
_RX_VIEWS_KEY = "pipeline.tun.rx"


class TunError(OSError):
    """Opening or configuring the TUN device failed; the message says what is needed."""


def _open_queue_fd(name: str, multi_queue: bool, offload: bool = False) -> tuple[int, str]:
    """Open /dev/net/tun and attach it to (or create) the TUN device ``name``.

    Returns the non-blocking fd and the device's name as the kernel settled it (a ``%d``
    pattern in ``name`` is filled in by the kernel). ``offload``: with virtio-net headers,
    partial checksums and TSO (pipeline/offload.py); every queue of a device must agree.
    """
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ:
        raise ValueError(f"TUN device name must be 1..{IFNAMSIZ - 1} bytes, got {name!r}")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise TunError(errno.ENOENT, _MISSING_HINT) from exc
    except PermissionError as exc:
        raise TunError(exc.errno, f"cannot open {TUN_PATH}: {_CAP_HINT}") from exc
    flags = (IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
             | (IFF_VNET_HDR if offload else 0))
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(encoded, flags))
        if offload:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS | TUN_F_USO4 | TUN_F_USO6)
            except OSError as exc:  # an older kernel: no UDP segmentation offload
                if exc.errno != errno.EINVAL:
                    raise
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise TunError(exc.errno, f"TUNSETIFF {name!r}: {_CAP_HINT}") from exc
        if exc.errno == errno.EBUSY:
            raise TunError(
                exc.errno,
                f"TUNSETIFF {name!r}: the device exists and is in use "
                "(or its multi-queue flag differs from this request)",
            ) from exc
        if exc.errno == errno.EINVAL and multi_queue:
            raise TunError(
                exc.errno,
                f"TUNSETIFF {name!r}: rejected; the device may exist without IFF_MULTI_QUEUE, "
                "or the kernel's queue limit is reached",
            ) from exc
        raise TunError(exc.errno, f"TUNSETIFF/TUNSETOFFLOAD {name!r} failed: {exc.strerror}"
                       ) from exc
    raw_name, _ = _IFREQ.unpack(ifr)
    return fd, raw_name.rstrip(b"\0").decode()


class TunQueue:
    """One queue (one fd) of a TUN device: what one reader reads from and writes to.

    The fd is non-blocking; wait for it with select/poll or ``loop.add_reader(queue, ...)``.
    Counters are plain ints, read by the metrics exporter.

    With ``offload`` (the device was opened with ``IFF_VNET_HDR`` and TSO, see
    pipeline/offload.py), reads cut the kernel's 64 KiB TCP packets into segments and
    complete partial checksums, and writes coalesce consecutive TCP segments of one
    connection. A packet cut into more segments than the batch has room for leaves the rest
    :meth:`pending`, for the next read (the fd may not be readable again meanwhile).
    """

    __slots__ = ("_fd", "_pending", "name", "offload", "rx_gso", "rx_gso_errors",
                 "rx_packets", "rx_too_big", "tx_coalesced", "tx_errors", "tx_packets")

    def __init__(self, fd: int, name: str, offload: bool = False) -> None:
        self._fd = fd
        self.name = name
        self.offload = offload
        self._pending: Superpacket | None = None  # segments left to emit
        self.rx_packets = 0
        self.rx_too_big = 0  # longer than a slot's payload area: truncated, marked TOO_BIG
        self.rx_gso = 0  # TCP packets read whole and cut into segments here
        self.rx_gso_errors = 0  # ... that could not be cut (dropped)
        self.tx_packets = 0
        self.tx_errors = 0  # writes the kernel refused (e.g. not an IPv4/IPv6 packet)
        self.tx_coalesced = 0  # packets written as part of a coalesced run

    @classmethod
    def attach(cls, name: str, offload: bool = False) -> TunQueue:
        """Attach a new queue to the existing multi-queue device ``name`` (e.g. in a worker)."""
        fd, settled = _open_queue_fd(name, multi_queue=True, offload=offload)
        return cls(fd, settled, offload)

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"TUN queue of {self.name} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def pending(self) -> bool:
        """Segments of a packet already read are waiting for the next :meth:`read_batch`."""
        return self._pending is not None

    def read_batch(self, batch: Batch, max_packets: int | None = None) -> int:
        """Read packets into ``batch`` from slot 0 on, until EAGAIN or ``max_packets``.

        Each packet lands at its slot's start + HEADROOM; its metadata gets offset and length,
        verdict PASS and zeroes elsewhere. A packet longer than the slot's payload area
        (``batch.max_packet``: the device MTU exceeds it) is kept, cut to that length, with
        verdict TOO_BIG, so that it is counted as a drop downstream. Sets and returns
        ``batch.count``.
        """
        limit = batch.capacity if max_packets is None else min(max_packets, batch.capacity)
        if self.offload:
            return self._read_offload(batch, limit)
        fd = self.fd
        views, offsets = _rx_views(batch)
        room = batch.max_packet
        readv = os.readv
        lengths: list[int] = []
        append = lengths.append
        try:
            for i in range(limit):
                append(readv(fd, views[i]))
        except BlockingIOError:
            pass
        finally:
            # Another error (EBADFD: the device was torn down) still leaves what was read in
            # the batch before it propagates.
            self._commit(batch, lengths, offsets, room)
        return batch.count

    def _read_offload(self, batch: Batch, limit: int) -> int:
        fd = self.fd
        views, offsets, heads, spill = _rx_vnet_views(batch)
        room = batch.max_packet
        readv = os.readv
        lengths: list[int] = []
        partial: list[int] = []  # slots whose checksum the sender left partial
        i = 0
        if self._pending is not None:
            i = self._emit(batch, 0, limit, lengths)
        try:
            while i < limit and self._pending is None:
                n = readv(fd, views[i]) - VNET_HDR_LEN
                h = i * VNET_HDR_LEN
                if heads[h + 1]:  # gso_type: a TCP packet to cut
                    i = self._cut(batch, i, n, limit, lengths, heads, spill)
                    continue
                if heads[h] & F_NEEDS_CSUM and n <= room:
                    partial.append(i)
                lengths.append(n)
                i += 1
        except BlockingIOError:
            pass
        finally:
            self._commit(batch, lengths, offsets, room)
            if partial:
                _complete(batch, partial, lengths, heads)
        return batch.count

    def _cut(self, batch: Batch, i: int, n: int, limit: int, lengths: list[int],
             heads: bytearray, spill: npt.NDArray[np.uint8]) -> int:
        """The GSO packet just read into slot ``i`` (its tail in the spill buffer): its
        segments from slot ``i`` on. Returns the next free slot."""
        room = batch.max_packet
        at = i * batch.slot_size + HEADROOM
        packet = np.empty(n, dtype=np.uint8)
        packet[: min(n, room)] = batch.data[at : at + min(n, room)]
        if n > room:
            packet[room:] = spill[: n - room]
        _, gso_type, _, gso_size, _, _ = VNET_HDR.unpack_from(heads, i * VNET_HDR_LEN)
        try:
            self._pending = Superpacket.parse(packet, gso_type, gso_size, room)
        except OffloadError:
            self.rx_gso_errors += 1
            return i  # dropped: the slot takes the next packet
        self.rx_gso += 1
        return self._emit(batch, i, limit, lengths)

    def _emit(self, batch: Batch, i: int, limit: int, lengths: list[int]) -> int:
        sp = self._pending
        assert sp is not None
        got = sp.emit(batch.data, i * batch.slot_size + HEADROOM, batch.slot_size, limit - i)
        lengths.extend(got)
        if not sp.remaining:
            self._pending = None
        return i + len(got)

    def _commit(
        self, batch: Batch, lengths: list[int], offsets: npt.NDArray[np.uint32], room: int
    ) -> None:
        n = len(lengths)
        batch.count = n
        if n == 1:  # a lone packet (sparse traffic): no numpy
            length, verdict = lengths[0], Verdict.PASS
            if length > room:
                self.rx_too_big += 1
                length, verdict = room, Verdict.TOO_BIG
            batch.set_row(0, int(offsets[0]), length, verdict=verdict)
            self.rx_packets += 1
        elif n:
            meta = batch.meta
            meta[:n] = 0  # verdict PASS, sa/flags/seq cleared
            meta["offset"][:n] = offsets[:n]
            got = meta["length"][:n]
            got[:] = lengths
            over = got > room
            if over.any():
                self.rx_too_big += int(over.sum())
                meta["verdict"][:n][over] = Verdict.TOO_BIG
                got[over] = room
            self.rx_packets += n

    def write_batch(self, batch: Batch) -> int:
        """Write every packet of ``batch`` whose verdict is PASS; return how many were sent.

        Nothing raises per packet: a write the kernel refuses is counted in ``tx_errors``.
        """
        fd = self.fd
        n = batch.count
        if not n:
            return 0
        if n == 1:  # a lone packet: no numpy
            offset, length, _, verdict, *_ = batch.row(0)
            offsets, lengths = ([offset], [length]) if verdict == Verdict.PASS else ([], [])
        else:
            meta = batch.meta[:n]
            passing = meta["verdict"] == Verdict.PASS
            if self.offload:
                return self._write_offload(batch, meta["offset"][passing].astype(np.int64),
                                           meta["length"][passing].astype(np.int64))
            offsets = meta["offset"][passing].tolist()
            lengths = meta["length"][passing].tolist()
        sent, errors = self._write_each(fd, batch.memory()[0], offsets, lengths)
        self.tx_packets += sent
        self.tx_errors += errors
        return sent

    def _write_each(self, fd: int, data: memoryview, offsets: list[int],
                    lengths: list[int]) -> tuple[int, int]:
        """Write each packet alone (with a plain virtio-net header when offloading);
        (sent, refused)."""
        head = (offload.NO_OFFLOAD,) if self.offload else ()
        writev = os.writev
        sent = errors = 0
        for off, length in zip(offsets, lengths, strict=True):
            try:
                writev(fd, (*head, data[off : off + length]))
                sent += 1
            except OSError:
                errors += 1
        return sent, errors

    def _write_offload(self, batch: Batch, offsets: npt.NDArray[np.int64],
                       lengths: npt.NDArray[np.int64]) -> int:
        """Write with virtio-net headers: coalesced runs as one packet, the rest alone."""
        fd = self.fd
        data = batch.memory()[0]
        runs = offload.coalesce(batch.data, offsets, lengths, batch.slot_size)
        offs = offsets.tolist()
        lens = lengths.tolist()
        sent = errors = coalesced = 0
        i = 0
        for run in [*runs, None]:
            stop = len(offs) if run is None else run.first
            ok, refused = self._write_each(fd, data, offs[i:stop], lens[i:stop])
            sent += ok
            errors += refused
            if run is None:
                break
            first, last = run.first, run.last
            off = offs[first]
            l4 = offload.IPV6_LEN if data[off] >> 4 == 6 else (data[off] & 0xF) * 4
            header = l4 + (data[off + l4 + offload.TCP_DOFF] >> 4) * 4
            parts = [data[o + header : o + m] for o, m in
                     zip(offs[first : last + 1], lens[first : last + 1], strict=True)]
            payload = sum(lens[first : last + 1]) - header * (last - first + 1)
            end = offs[last]
            vnet, head = offload.run_header(data, off, header, l4, payload, lens[first] - header,
                                            bool(data[end + l4 + offload.TCP_FLAGS]
                                                 & offload.PSH))
            count = last - first + 1
            try:
                os.writev(fd, [vnet, head, *parts])
                sent += count
                coalesced += count
            except OSError:
                errors += count
            i = last + 1
        self.tx_packets += sent
        self.tx_errors += errors
        self.tx_coalesced += coalesced
        return sent


def _rx_views(batch: Batch) -> tuple[list[list[memoryview]], npt.NDArray[np.uint32]]:
    """Per slot, the iovec list for os.readv and the slot's packet offset.

    The iovecs are the slot's payload area plus one spill byte shared by all slots: TUN
    reads return the bytes copied (a longer packet is cut silently), so a read that reaches
    the spill byte is how a packet too long for its slot is recognised.
    Cached on the batch, which is reused batch after batch, so a read allocates nothing.
    """
    cached = batch._views.get(_RX_VIEWS_KEY)
    if cached is None:
        data = memoryview(batch.data)  # type: ignore[arg-type]
        room = batch.max_packet
        spill = memoryview(bytearray(1))
        offsets = np.arange(batch.capacity, dtype=np.uint32) * batch.slot_size + HEADROOM
        views = [[data[off : off + room], spill] for off in offsets.tolist()]
        cached = (views, offsets)
        batch._views[_RX_VIEWS_KEY] = cached
    return cached  # type: ignore[return-value]


_VNET_VIEWS_KEY = "pipeline.tun.rx.vnet"
_SPILL = 1 << 16  # a GSO packet's bytes beyond its slot: at most 64 KiB in all


def _rx_vnet_views(batch: Batch) -> tuple[list[list[memoryview]], npt.NDArray[np.uint32],
                                           bytearray, npt.NDArray[np.uint8]]:
    """``_rx_views`` with a virtio-net header before each slot (all of them in one
    bytearray, header i at ``i * VNET_HDR_LEN``) and a 64 KiB spill buffer after it, where
    the rest of a GSO packet lands. Cached on the batch."""
    cached = batch._views.get(_VNET_VIEWS_KEY)
    if cached is None:
        data = memoryview(batch.data)  # type: ignore[arg-type]
        room = batch.max_packet
        heads = bytearray(batch.capacity * VNET_HDR_LEN)
        hv = memoryview(heads)
        spill = np.zeros(_SPILL, dtype=np.uint8)
        sv = memoryview(spill)  # type: ignore[arg-type]
        offsets = np.arange(batch.capacity, dtype=np.uint32) * batch.slot_size + HEADROOM
        views = [[hv[i * VNET_HDR_LEN : (i + 1) * VNET_HDR_LEN], data[off : off + room], sv]
                 for i, off in enumerate(offsets.tolist())]
        cached = (views, offsets, heads, spill)
        batch._views[_VNET_VIEWS_KEY] = cached
    return cached  # type: ignore[return-value]


_PLAIN_MAX = 10  # below this many partial checksums, plain Python beats numpy's fixed cost


def _complete(batch: Batch, slots: list[int], lengths: list[int], heads: bytearray) -> None:
    """Complete the partial checksums of the packets in ``slots`` (pipeline/offload.py);
    ``lengths``: every slot's packet length, from slot 0."""
    unpack = VNET_HDR.unpack_from
    stride = batch.slot_size
    mv = memoryview(batch.data)  # type: ignore[arg-type]
    if len(slots) < _PLAIN_MAX:  # sparse traffic: plain Python
        for i in slots:
            _, _, _, _, start, field = unpack(heads, i * VNET_HDR_LEN)
            offload.complete_one(mv, i * stride + HEADROOM, lengths[i], start, field)
        return
    fields = np.array([unpack(heads, i * VNET_HDR_LEN)[4:] for i in slots], dtype=np.int64)
    idx = np.array(slots, dtype=np.int64)
    offsets = idx * stride + HEADROOM
    sizes = np.array(lengths, dtype=np.int64)[idx]
    done = offload.complete_checksums(batch.data, offsets, sizes, fields[:, 0], fields[:, 1],
                                      stride)
    if not done.all():  # a checksum start not 4-byte aligned (odd IPv6 extension headers)
        for k in np.flatnonzero(~done).tolist():
            offload.complete_one(mv, int(offsets[k]), int(sizes[k]), int(fields[k, 0]),
                                 int(fields[k, 1]))


def _prefix(route: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(route, strict=True)


class TunDevice:
    """A TUN device with its address and routes, in the caller's network namespace.

    ``TunDevice(name, mtu=..., address="10.99.0.1/24", routes=["10.98.0.0/24"])`` creates the
    device (``IFF_TUN | IFF_NO_PI``; ``queues > 1`` adds ``IFF_MULTI_QUEUE`` and one fd per
    queue; ``offload`` adds ``IFF_VNET_HDR`` with checksum and TCP segmentation offloads,
    see :class:`TunQueue`), sets the MTU, brings it up, adds the address and routes the
    remote subnets into it.
    ``close()`` (idempotent; also on leaving a ``with`` block) removes the routes it added and
    closes the fds, which removes the device.

    ``read_batch``/``write_batch``/``fileno`` act on queue 0; ``queues`` holds them all.
    """

    def __init__(
        self,
        name: str = "espl%d",
        *,
        mtu: int | None = None,
        address: str | None = None,
        routes: Iterable[str] = (),
        queues: int = 1,
        multi_queue: bool | None = None,
        offload: bool = False,
    ) -> None:
        if queues < 1:
            raise ValueError(f"queues must be >= 1, got {queues}")
        mq = queues > 1 if multi_queue is None else multi_queue
        if queues > 1 and not mq:
            raise ValueError("several queues need IFF_MULTI_QUEUE")
        # The routes added, in order (a dict: found without a scan among thousands), and
        # one netlink socket for them, opened at the first (a socket per route costs more
        # than the route).
        self._routes: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, None] = {}
        self._netlink: RouteSocket | None = None
        self.queues: tuple[TunQueue, ...] = ()
        self.ifindex = 0
        fd, self.name = _open_queue_fd(name, mq, offload)
        opened = [TunQueue(fd, self.name, offload)]
        self.queues = tuple(opened)
        try:
            for _ in range(queues - 1):
                fd, _same = _open_queue_fd(self.name, True, offload)
                opened.append(TunQueue(fd, self.name, offload))
                self.queues = tuple(opened)
            self._configure(mtu, address, routes)
        except BaseException:
            self.close()
            raise

    def _configure(self, mtu: int | None, address: str | None, routes: Iterable[str]) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise TunError(errno.ENODEV, f"TUN device {self.name} vanished after creation")
            self.ifindex = int(found[0])
            try:
                if mtu is not None:
                    ipr.link("set", index=self.ifindex, mtu=mtu)
                ipr.link("set", index=self.ifindex, state="up")
                if address is not None:
                    iface = ipaddress.ip_interface(address)
                    ipr.addr(
                        "add",
                        index=self.ifindex,
                        address=str(iface.ip),
                        prefixlen=iface.network.prefixlen,
                    )
            except NetlinkError as exc:
                raise self._netlink_error("configure", exc) from exc
        for route in routes:
            self.add_route(route)

    def _netlink_error(self, what: str, exc: NetlinkError) -> TunError:
        code = int(exc.code)
        hint = f": {_CAP_HINT}" if code == errno.EPERM else ""
        return TunError(code, f"{what} TUN device {self.name}: {exc}{hint}")

    # -- routes ---------------------------------------------------------------------------

    @property
    def routes(self) -> tuple[str, ...]:
        """The remote subnets this device routes, as added."""
        return tuple(str(r) for r in self._routes)

    def add_route(self, route: str) -> None:
        """Route the remote subnet ``route`` (e.g. a Child SA's remote TS) into the device."""
        net = _prefix(route)
        if net in self._routes:
            return
        self._require_open()
        try:
            self._rtnl().add(net, self.ifindex)
        except NetlinkError as exc:
            raise self._netlink_error(f"add route {net} via", exc) from exc
        self._routes[net] = None

    def remove_route(self, route: str) -> None:
        """Withdraw a route added by :meth:`add_route`; a route already gone is not an error."""
        net = _prefix(route)
        if net not in self._routes:
            return
        del self._routes[net]
        self._del_route(net)

    def _rtnl(self) -> RouteSocket:
        if self._netlink is None:
            self._netlink = RouteSocket()
        return self._netlink

    def _del_route(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        try:
            self._rtnl().delete(net, self.ifindex)
        except NetlinkError as exc:
            # ESRCH: already gone (the device went down, or someone removed it).
            if exc.code not in (errno.ESRCH, errno.ENODEV):
                raise self._netlink_error(f"remove route {net} via", exc) from exc

    # -- I/O (queue 0) ----------------------------------------------------------------------

    @property
    def fd(self) -> int:
        self._require_open()
        return self.queues[0].fd

    def fileno(self) -> int:
        return self.fd

    def read_batch(self, batch: Batch, max_packets: int | None = None) -> int:
        self._require_open()
        return self.queues[0].read_batch(batch, max_packets)

    def write_batch(self, batch: Batch) -> int:
        self._require_open()
        return self.queues[0].write_batch(batch)

    def pending(self) -> bool:
        """Queue 0 holds segments of a packet read already (:meth:`TunQueue.pending`)."""
        return bool(self.queues) and self.queues[0].pending()

    # -- lifetime -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not self.queues or all(q.closed for q in self.queues)

    def _require_open(self) -> None:
        if self.closed:
            raise ValueError(f"TUN device {self.name} is closed")

    def close(self) -> None:
        """Remove the routes this device added, then close its queues (removing the device)."""
        if self.closed:
            return
        try:
            if self._routes and self.ifindex:
                while self._routes:
                    self._del_route(self._routes.popitem()[0])
        finally:
            self._routes.clear()
            if self._netlink is not None:
                self._netlink.close()
                self._netlink = None
            for q in self.queues:
                q.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.queues)} queue(s)"
        return f"<TunDevice {self.name} ifindex={self.ifindex} {state}>"
