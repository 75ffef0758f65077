"""The portable outside interface: ESP and ESP-in-UDP through ordinary sockets (DESIGN §7).

Receiving: a raw socket for IP protocol 50 (IPv4 hands over the IP header with it) and a UDP
socket on the NAT-T port (RFC 3948; the kernel strips IP and UDP, so both are rebuilt in the
slot's headroom for the codec, which parses whole packets). Having a raw ESP socket also keeps
a kernel without ESP support from answering ESP with ICMP protocol-unreachable: the packet
was delivered. Sending: one raw IPPROTO_RAW socket (the IP header is ours, IP_HDRINCL).

IPv4 only for now; the AF_PACKET outside (pipeline/afpacket.py) is the fast path.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import numpy as np

from pipeline.batch import HEADROOM, Batch, Verdict

__all__ = ["SocketOutside"]

IPPROTO_ESP = 50
IPV4_UDP_HDRS = 28  # IPv4 (20) + UDP (8) rebuilt in front of a UDP payload
# Receive buffers: the default (net.core.rmem_default, 208 KiB) holds a few hundred packets
# (each costs its buffer's truesize, about 1 KiB for a small one): tens of ms at 10 000
# packets/s while the I/O loop is busy. Past it the kernel drops (UDP RcvbufErrors, raw
# socket drops) where no espline counter sees it; measured: 1858 of 9819 in a 2 s burst.
RCVBUF = 8 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # over rmem_max, with CAP_NET_ADMIN


def _grow_rcvbuf(sock: socket.socket, size: int = RCVBUF) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:  # no CAP_NET_ADMIN: as much as rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class SocketOutside:
    def __init__(self, local_addr: ipaddress.IPv4Address, nat_t_port: int | None = 4500) -> None:
        if local_addr.version != 4:
            raise ValueError("socket outside mode supports IPv4 only; use af_packet for IPv6")
        self.local = local_addr
        self.nat_t_port = nat_t_port
        self.esp = socket.socket(socket.AF_INET, socket.SOCK_RAW, IPPROTO_ESP)
        self.esp.bind((str(local_addr), 0))
        self.esp.setblocking(False)
        _grow_rcvbuf(self.esp)
        self.udp: socket.socket | None = None
        if nat_t_port is not None:
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.udp.bind((str(local_addr), nat_t_port))
            self.udp.setblocking(False)
            _grow_rcvbuf(self.udp)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.tx.setblocking(False)
        self.send_errors = 0
        self._udp_hdr = struct.Struct("!BBHHHBBH4s4sHHHH")

    def fileno_list(self) -> list[int]:
        fds = [self.esp.fileno()]
        if self.udp is not None:
            fds.append(self.udp.fileno())
        return fds

    def read_batch(self, batch: Batch, max_packets: int) -> int:
        """Append what is waiting (up to ``max_packets`` in all) to ``batch``."""
        mv = batch.memory()[0]
        size = batch.slot_size
        room = batch.max_packet
        limit = min(max_packets, batch.capacity)
        i = batch.count
        local = self.local.packed
        while i < limit:
            base = i * size + HEADROOM
            try:
                n = self.esp.recv_into(mv[base : base + room])
            except BlockingIOError:
                break
            batch.set_row(i, base, n)
            i += 1
        while self.udp is not None and i < limit:
            base = i * size + HEADROOM
            try:
                n, (src, sport) = self.udp.recvfrom_into(mv[base + IPV4_UDP_HDRS : base + room])
            except BlockingIOError:
                break
            total = n + IPV4_UDP_HDRS
            self._udp_hdr.pack_into(mv, base, 0x45, 0, total, 0, 0, 64, 17, 0,
                                    socket.inet_aton(src), local, sport, self.nat_t_port or 0,
                                    n + 8, 0)
            batch.set_row(i, base, total)
            i += 1
        got = i - batch.count
        batch.count = i
        return got

    def write_batch(self, batch: Batch) -> int:
        """Send every passing packet (each a whole IPv4 packet); returns how many left."""
        mv = batch.memory()[0]
        n = batch.count
        if n == 1:  # a lone packet: no numpy
            off, ln, _, verdict, *_ = batch.row(0)
            todo = [(off, ln)] if verdict == Verdict.PASS else []
        else:
            meta = batch.meta
            live = np.flatnonzero(meta["verdict"][:n] == Verdict.PASS)
            todo = list(zip(meta["offset"][live].tolist(), meta["length"][live].tolist(),
                            strict=True))
        sent = 0
        for off, ln in todo:
            dst = socket.inet_ntoa(mv[off + 16 : off + 20])
            try:
                self.tx.sendto(mv[off : off + ln], (dst, 0))
                sent += 1
            except OSError:
                self.send_errors += 1
        return sent

    def io_stats(self) -> dict[str, int]:
        return {"send_errors": self.send_errors}

    def close(self) -> None:
        for s in (self.esp, self.udp, self.tx):
            if s is not None:
                s.close()
