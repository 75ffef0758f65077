"""What two espline gateways put on the wire, seen from the wire (tests/e2e_support.py lab).

    hostA --- gwA ==ESP== gwB --- hostB, each gateway ``python -m controller.cli run -c FILE``

The checks capture on the interfaces themselves (an AF_PACKET ring in gwB's namespace, an
AF_PACKET socket in the hosts'), send from the hosts, inject raw packets, kill a worker by
its PID, and compare what they saw with the gateways' ``stats.json``:

1. sequence numbers leave strictly increasing and without gaps, with two workers under a
   UDP flood;
2. a SIGKILLed worker is replaced, traffic resumes within a second, no sequence number is
   used twice, and every packet hostB missed is one the gateways counted as lost;
3. replayed and bit-flipped ESP packets injected on the wire are counted as ``replay`` and
   ``integrity`` (exactly) and never reach hostB;
4. TCP SYNs arrive with the MSS clamped to the tunnel, and a too-big DF packet gets ICMP
   fragmentation needed with the tunnel MTU (from the kernel in TUN mode, from espline in
   af_packet inside mode);
5. ping, TCP and UDP through the AF_PACKET outside and the AF_PACKET inside (bump in the
   wire) modes, without ICMP errors from the kernels on either side.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import (
    ETH,
    SIDE_A,
    SIDE_B,
    WAN,
    Tool,
    Tunnel,
    build_topology,
    echo_roundtrips,
    esp_fields,
    start_pair,
)
from tests.netns import (
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)

SPI_AB = f"{SIDE_A.spi_out:#010x}"
# The tunnel's inner MTU with aes128gcm16 over IPv4 and a 1500-byte outside MTU, by hand
# (RFC 4303 §2, RFC 4106 §3, RFC 3948 §2.1): outer IPv4 20 + UDP 8 (encap only) + SPI and
# sequence 8 + IV 8 + pad length and next header 2 + ICV 16; the encrypted part (inner packet
# + padding + 2) is a multiple of 4. UDP: 1500 - 62 = 1438 (1440 = 4 * 360). Raw: 1446.
INNER_MTU = {True: 1438, False: 1446}
MSS = {encap: mtu - 40 for encap, mtu in INNER_MTU.items()}  # minus IPv4 20 and TCP 20
HOST_MSS = 1460  # what the hosts advertise on their 1500-byte links


@pytest.fixture
def lab(netns_lab: NetnsLab) -> Iterator[NetnsLab]:
    require_root_netns()
    yield netns_lab


def final_stats(tunnel: Tunnel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stop both gateways (SIGTERM: they write stats.json once more at exit)."""
    codes = tunnel.stop()
    assert codes == [0, 0], tunnel.logs()
    a, b = tunnel.a.stats(), tunnel.b.stats()
    assert a is not None and b is not None
    return a, b


def sa_stats(stats: dict[str, Any], spi: str, direction: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in stats["sas"]
                                 if s["spi"] == spi and s["direction"] == direction)
    return found


def post_sequence_drops(stats: dict[str, Any]) -> int:
    """Outbound drops that happen after a packet got its sequence number (all but the SPD's),
    each a gap on the wire like a lost batch."""
    return sum(n for reason, n in stats["outbound"]["drops"].items() if reason != "policy")


def gaps(seqs: list[int]) -> int:
    return sum(b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False) if b > a + 1)


def assert_strictly_increasing(seqs: list[int]) -> None:
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(seqs, seqs[1:], strict=False)) if b <= a]
    assert not bad, f"{len(bad)} sequence numbers not above their predecessor: {bad[:10]}"
    assert len(set(seqs)) == len(seqs)


def kernel_drops(tunnel: Tunnel) -> dict[str, int]:
    """Drops that happen in the kernels on the way hostA -> hostB, where no espline counter
    sees them: the TUN queue of gwA (tx_dropped), UDP receive buffers of gwB and hostB."""
    out: dict[str, int] = {}
    topo = tunnel.topo
    for name, ns in (("gwA", topo.gw_a), ("gwB", topo.gw_b), ("hostB", topo.host_b)):
        links = json.loads(ns.ip("-s", "-j", "link", "show").stdout)
        for link in links:
            out[f"{name}:{link['ifname']}:tx_dropped"] = link["stats64"]["tx"]["dropped"]
            out[f"{name}:{link['ifname']}:rx_dropped"] = link["stats64"]["rx"]["dropped"]
        snmp = ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
        for head, vals in zip(snmp[::2], snmp[1::2], strict=False):
            if head.startswith("Udp:"):
                row = dict(zip(head.split()[1:], map(int, vals.split()[1:]), strict=True))
                out[f"{name}:udp:RcvbufErrors"] = row["RcvbufErrors"]
    return {k: v for k, v in out.items() if v}


def wait_worker_pids(tunnel: Tunnel, n: int) -> list[int]:
    s = tunnel.a.wait_stats(lambda s: len(s["worker_pids"]) == n, 10, "worker pids")
    return list(s["worker_pids"])


# -- 1 -----------------------------------------------------------------------------------------


def test_sequence_numbers_on_the_wire_increase_with_two_workers(lab: NetnsLab,
                                                                tmp_path: Path) -> None:
    """A 20 000-packet UDP flood through gwA's two workers: on gwB's wire every sequence
    number of the SA is above the one before (the reassembler releases batches in the order
    the dispatcher numbered them) and none is used twice. No worker dies, so no batch may
    be given up on: a busy worker's batch is waited for, and there is no gap at all (gaps
    are allowed only where a worker died and the loss was counted: the next test). Batches
    of 8 packets or more go to the workers, smaller ones the I/O process does itself: the
    two kinds interleave, and the order holds across them."""
    tunnel = start_pair(lab, tmp_path, encap=False, workers=2, handoff_min=8)
    topo = tunnel.topo
    wait_worker_pids(tunnel, 2)
    cap = Tool.start(topo.gw_b, tmp_path, "capture", "capture", "--iface", WAN)
    rx = Tool.start(topo.host_b, tmp_path, "rx", "udp-recv", "--port", "9000")
    tx = Tool.start(topo.host_a, tmp_path, "tx", "udp-send", "--dst", SIDE_B.host, "--port",
                    "9000", "--count", "20000", "--rate", "10000", "--size", "64")
    sent = tx.wait(60)
    time.sleep(0.5)  # the last batches through both gateways
    got, wire = rx.finish(), cap.finish()
    a, b = final_stats(tunnel)

    assert wire["ring"]["kernel_drops"] == 0, wire["ring"]  # the capture saw everything
    assert set(wire["seqs"]) == {SPI_AB}, wire["seqs"].keys()  # only A->B ESP on B's wire
    seqs = wire["seqs"][SPI_AB]
    assert sent["sent"] == 20_000
    # gwA took at least a few thousand of the packets (the rest, if it could not keep up,
    # the kernel dropped at the TUN queue before any sequence number was given).
    assert len(seqs) >= 3000, (len(seqs), a["outbound"])
    assert_strictly_increasing(seqs)
    out_sa = sa_stats(a, SPI_AB, "out")
    # The capture started after the handshake pings; it saw the rest up to gwA's last.
    assert seqs[-1] == out_sa["seq_out"], (seqs[-1], out_sa)
    # No worker died, so no batch was given up on (a busy worker's is waited for), and
    # there is no gap at all.
    assert a["worker_restarts"] == 0 and a["lost_batches"] == 0, a
    assert gaps(seqs) == post_sequence_drops(a) == 0, (gaps(seqs), a["outbound"])
    # Both paths carried part of the flood.
    assert min(a["worker_batches"].values()) > 0 and a["inline_batches"] > 0, a
    assert b["lost_batches"] == 0, b
    # gwB accepted them in order: its window's top is the last one.
    assert sa_stats(b, SPI_AB, "in")["replay_top"] == seqs[-1]
    assert got["duplicates"] == 0 and got["corrupt"] == 0, got


# -- 2 -----------------------------------------------------------------------------------------


def test_sigkilled_worker_traffic_resumes_and_loss_is_counted(lab: NetnsLab,
                                                              tmp_path: Path) -> None:
    """SIGKILL one of gwA's two workers (its PID from stats.json) in the middle of a
    2000 packets/s stream, every batch of which goes to a worker."""
    tunnel = start_pair(lab, tmp_path, encap=True, workers=2, handoff_min=1)
    topo = tunnel.topo
    pids = wait_worker_pids(tunnel, 2)
    cap = Tool.start(topo.gw_b, tmp_path, "capture", "capture", "--iface", WAN)
    rx = Tool.start(topo.host_b, tmp_path, "rx", "udp-recv", "--port", "9000")
    rate, count = 2000, 8000
    tx = Tool.start(topo.host_a, tmp_path, "tx", "udp-send", "--dst", SIDE_B.host, "--port",
                    "9000", "--count", str(count), "--rate", str(rate), "--size", "200")
    time.sleep(1.5)
    victim = pids[0]
    # Exactly that PID, and only while it is still gwA's child (not a reused PID).
    with open(f"/proc/{victim}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == tunnel.a.proc.pid
    killed_at = time.monotonic_ns()
    os.kill(victim, signal.SIGKILL)
    sent = tx.wait(30)
    time.sleep(0.5)
    got, wire = rx.finish(), cap.finish()
    drops = kernel_drops(tunnel)  # before the TUN devices go with their gateways
    # Replaced: two workers again, the victim not among them (the last stats.json, at exit,
    # lists none: they are stopped by then).
    running = tunnel.a.wait_stats(lambda s: s["worker_restarts"] >= 1, 5, "a restart")
    assert victim not in running["worker_pids"], running["worker_pids"]
    assert len(running["worker_pids"]) == 2, running["worker_pids"]
    a, b = final_stats(tunnel)
    assert a["worker_restarts"] >= 1, a
    # No sequence number used twice, before, across or after the kill.
    assert wire["ring"]["kernel_drops"] == 0, wire["ring"]
    seqs = wire["seqs"][SPI_AB]
    assert_strictly_increasing(seqs)
    # Every hole on the wire is a packet of a batch gwA gave up on (it died with the worker).
    assert gaps(seqs) == a["lost_packets"] + post_sequence_drops(a), (gaps(seqs), a)
    # Traffic resumed within a second: the first packet sent after the kill arrived less
    # than a second after it, and hostB never went a second without a packet.
    recv, sent_ns = got["recv_ns"], got["sent_ns"]
    after = [r for r, s in zip(recv, sent_ns, strict=True) if s > killed_at]
    assert after, "nothing sent after the kill arrived"
    assert (min(after) - killed_at) / 1e9 < 1.0, (min(after) - killed_at) / 1e9
    arrivals = sorted(recv)
    silence = max(y - x for x, y in zip(arrivals, arrivals[1:], strict=False)) / 1e9
    assert silence < 1.0, silence
    # gwB's workers all lived: it gave up on no batch (a late one is waited for).
    assert b["lost_batches"] == 0 and b["worker_restarts"] == 0, b
    # What hostB missed is what was counted: batches lost with the worker (gwA), drops by
    # verdict at gwB, and kernel queue drops (at gwA's TUN while the new worker starts).
    assert got["duplicates"] == 0 and got["corrupt"] == 0, got
    missed = sent["sent"] - len(set(got["counters"]))
    counted = (a["lost_packets"] + post_sequence_drops(a) + b["lost_packets"]
               + sum(b["inbound"]["drops"].values()) + sum(drops.values()))
    assert missed == counted, (missed, a["lost_batches"], a["lost_packets"], b, drops)


# -- 3 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encap", [True, False], ids=["udp-encap", "raw-esp"])
def test_injected_replays_and_bit_flips_are_counted_and_dropped(lab: NetnsLab, tmp_path: Path,
                                                                encap: bool) -> None:
    """40 ESP packets captured on gwB's wire are sent again from gwA's namespace: as they
    were (replays), and with bit 20 of the sequence number flipped (fresh for the window,
    so they reach the ICV check) plus one more bit of the IV, ciphertext or ICV; 4 more
    with a flipped SPI. gwB counts exactly 40 replay, 40 integrity and 4 no_sa drops, hostB
    gets each of its payloads once, and the window did not move: later packets still pass."""
    tunnel = start_pair(lab, tmp_path, encap=encap, workers=2)
    topo = tunnel.topo
    cap = Tool.start(topo.gw_b, tmp_path, "capture", "capture", "--iface", WAN, "--keep", "40")
    rx = Tool.start(topo.host_b, tmp_path, "rx", "udp-recv", "--port", "9000")
    send = ("udp-send", "--dst", SIDE_B.host, "--port", "9000", "--rate", "400", "--size",
            "300")
    Tool.start(topo.host_a, tmp_path, "tx1", *send, "--count", "40").wait(30)
    before = tunnel.b.wait_stats(lambda s: sa_stats(s, SPI_AB, "in")["packets"] >= 41, 10,
                                 "40 packets at gwB")  # and the handshake's ping
    wire = cap.finish()
    kept = [bytes.fromhex(h) for h in wire["kept"]]
    assert len(kept) == 40 and all(esp_fields(p) is not None for p in kept), wire
    assert before["inbound"]["drops"] == {}, before["inbound"]

    flipped, bad_spi = [], []
    for i, pkt in enumerate(kept):
        fields = esp_fields(pkt)
        assert fields is not None
        esp = fields[2]
        p = bytearray(pkt)
        p[esp + 5] ^= 0x10  # sequence number bit 20: ahead of the window, not a replay
        body = range(esp + 8, len(p))  # IV, ciphertext, ICV
        p[body[(i * 37) % len(body)]] ^= 1 << (i % 8)
        flipped.append(bytes(p))
        if i < 4:
            q = bytearray(pkt)
            q[esp] ^= 0x80  # an SPI gwB does not have
            bad_spi.append(bytes(q))
    inject = tmp_path / "inject.json"
    inject.write_text(json.dumps([p.hex() for p in kept + flipped + bad_spi]))
    topo.gw_a.python("-m", "tests.e2e_support", "inject", "--file", str(inject), "--gap",
                     "0.001")
    want = {"replay": 40, "integrity": 40, "no_sa": 4}
    tunnel.b.wait_stats(lambda s: s["inbound"]["drops"] == want, 10, f"drops {want}")
    # The SA still takes new packets: no injected one moved the window.
    Tool.start(topo.host_a, tmp_path, "tx2", *send, "--count", "10", "--first", "40").wait(30)
    tunnel.b.wait_stats(lambda s: sa_stats(s, SPI_AB, "in")["packets"] >= 51, 10,
                        "10 more packets at gwB")
    got = rx.finish()
    a, b = final_stats(tunnel)
    assert b["inbound"]["drops"] == want, b["inbound"]
    assert b["lost_packets"] == 0
    assert sorted(got["counters"]) == list(range(50)), got["counters"]  # each once, no more
    assert got["corrupt"] == 0 and got["foreign"] == 0, got


# -- 4 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", ["tun", "af_packet"])
def test_mss_clamped_and_icmp_too_big_on_the_wire(lab: NetnsLab, tmp_path: Path,
                                                  inside: str) -> None:
    """hostA's SYN (MSS 1460) reaches hostB with the MSS that fits the tunnel, and so does
    hostB's SYN-ACK on the way back; a DF packet of exactly the inner MTU gets through, one
    of 1500 bytes gets ICMP fragmentation needed with the inner MTU: from gwA's kernel in
    TUN mode (the TUN device's MTU is the tunnel's), from espline itself in af_packet
    inside mode (pipeline/mtu.icmp_too_big, sent from the SA's local address)."""
    encap = True
    topo = build_topology(lab, inside=inside)
    sniff_a = Tool.start(topo.host_a, tmp_path, "sniff-a", "sniff", "--iface", ETH)
    sniff_b = Tool.start(topo.host_b, tmp_path, "sniff-b", "sniff", "--iface", ETH)
    tunnel = start_pair(lab, tmp_path, encap=encap, inside=inside, topo=topo)
    echo_roundtrips(tunnel, (7003, 7004))  # TCP: SYN, SYN-ACK, full-size segments
    mtu = INNER_MTU[encap]
    for port, total in ((9301, mtu), (9302, 1500)):  # IPv4 20 + UDP 8 + payload
        Tool.start(topo.host_a, tmp_path, f"df{total}", "udp-send", "--dst", SIDE_B.host,
                   "--port", str(port), "--count", "3", "--rate", "5", "--size",
                   str(total - 28), "--df").wait(30)
    time.sleep(0.3)
    at_a, at_b = sniff_a.finish(), sniff_b.finish()
    a, b = final_stats(tunnel)

    def syns(seen: dict[str, Any], *, out: bool, ack: bool) -> set[int | None]:
        return {s["mss"] for s in seen["syns"] if s["out"] is out
                and bool(s["flags"] & 0x10) is ack and (s["dst"] if out else s["src"])
                in (SIDE_A.host, SIDE_B.host)}

    assert syns(at_a, out=True, ack=False) == {HOST_MSS}  # hostA's SYNs as sent
    assert syns(at_b, out=False, ack=False) == {MSS[encap]}  # ... as hostB got them
    assert syns(at_b, out=True, ack=True) == {HOST_MSS}  # hostB's SYN-ACKs as sent
    assert syns(at_a, out=False, ack=True) == {MSS[encap]}  # ... as hostA got them
    assert a["mss_clamped"] >= 1 and b["mss_clamped"] >= 1, (a, b)

    frag_needed = [i for i in at_a["icmp"] if not i["out"] and (i["type"], i["code"]) == (3, 4)]
    assert frag_needed, at_a["icmp"]
    assert {i["mtu"] for i in frag_needed} == {mtu}, frag_needed
    # Who answered: gwA's kernel (tun) or espline (af_packet), both from gwA's inside
    # address, the one the host knows its gateway by.
    assert {i["src"] for i in frag_needed} == {SIDE_A.gw_lan}, frag_needed
    assert (a["icmp_too_big"] >= 1) if inside == "af_packet" else (a["icmp_too_big"] == 0), a
    arrived = [u for u in at_b["udp"] if not u["out"]]
    assert [u["len"] for u in arrived if u["dport"] == 9301] == [mtu] * 3, arrived
    assert not [u for u in arrived if u["dport"] == 9302], arrived


# -- 5 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("inside", "outside", "encap"), [
    ("tun", "af_packet", True),
    ("af_packet", "socket", False),
    ("af_packet", "af_packet", True),
], ids=["outside-afpacket-udp", "inside-afpacket-raw", "both-afpacket-udp"])
def test_af_packet_modes_carry_ping_tcp_udp(lab: NetnsLab, tmp_path: Path, inside: str,
                                            outside: str, encap: bool) -> None:
    """Ping both ways, TCP and UDP echo, with AF_PACKET rings outside and/or inside. Inside
    af_packet is a bump in the wire: gwA's and gwB's kernels keep IPv4 forwarding off, so
    only espline carries the hosts' traffic (the kernel would otherwise also try to route
    each packet and answer it with ICMP net unreachable). No ICMP error shows up at the hosts
    or on the outside link (the kernels answer no ESP or ESP-in-UDP: espline claims them)."""
    topo = build_topology(lab, inside=inside)
    sniffs = {name: Tool.start(ns, tmp_path, f"sniff-{name}", "sniff", "--iface", iface)
              for name, ns, iface in (("hostA", topo.host_a, ETH), ("wanA", topo.gw_a, WAN),
                                      ("hostB", topo.host_b, ETH))}
    # Both rings AF_PACKET: batches of two or more go to the workers as packet heads, the
    # workers copying the rest from the rings they map (pipeline/region.py).
    both = inside == outside == "af_packet"
    tunnel = start_pair(lab, tmp_path, encap=encap, inside=inside, outside=outside, topo=topo,
                        handoff_min=2 if both else None)
    assert topo.host_b.ping(SIDE_A.host, timeout=5)
    echo_roundtrips(tunnel)
    seen = {name: tool.finish() for name, tool in sniffs.items()}
    a, b = final_stats(tunnel)
    for name, got in seen.items():
        assert got["icmp"] == [], (name, got["icmp"])
    # The hosts' traffic went through espline (300 kB of TCP each way is > 200 packets).
    for stats in (a, b):
        assert stats["outbound"]["passed"] > 200 and stats["inbound"]["passed"] > 200, stats
        assert stats["lost_packets"] == 0
        assert stats["inbound"]["drops"] == {}, stats  # (no integrity failure, no replay)
        assert stats["heads_batches"] > 0 or not both, stats
    if outside == "af_packet":  # the default ring pair (pipeline/rxpair.py)
        for stats in (a, b):
            io = stats["outside_io"]
            assert io["rx_to_bulk"] >= io["rx_to_sparse"] >= io["rx_to_bulk"] - 1, io
            assert io["rx_drain_timeouts"] == io["rx_kernel_drops"] == 0, io
    if inside == "af_packet":  # the hosts' TSO packets, cut by the inside ring
        assert sum(s["inside_io"]["rx_gso"] for s in (a, b)) > 0, (a, b)
        assert all(s["inside_io"]["rx_gso_errors"] == s["inside_io"]["rx_too_big"] == 0
                   for s in (a, b)), (a, b)
