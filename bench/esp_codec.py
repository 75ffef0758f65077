"""ESP codec micro-benchmark: one core, batches of 256, against the bare AEAD calls.

For each (op, algorithm, mode, size) it measures, interleaved in the same run:
- ``pps``: packets per second through ``EspCodec.encap`` / ``decap`` (the whole codec:
  header parsing and building, padding, nonces, the crypto, verdicts, replay window);
- ``aead_only_pps``: a bare loop of the same AEAD calls over the same packets, with every
  argument prepared beforehand (the ceiling any Python codec can reach);
- ``ratio = pps / aead_only_pps``, the median of per-round ratios (robust to machine drift).

Refilling the batch between rounds (what ZeroMQ ``recv_into`` does in a worker) is outside
the timed region for both. ``mixed`` rows change every packet's size on every batch, which
defeats the per-slot view cache (workers/views.py): the cost of new geometry.

    python -m bench.esp_codec            # table
    python -m bench.esp_codec --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import starmap

import numpy as np

from pipeline.batch import Batch
from pipeline.satable import Direction, Mode, SaRecord
from workers.algorithms import parse_esp
from workers.esp import EspCodec, _consume
from workers.replay import ReplayWindow
from workers.sa import SaState, SaTable

BATCH = 256
LOCAL = ipaddress.ip_address("192.0.2.1")
REMOTE = ipaddress.ip_address("192.0.2.2")


def inner_packet(size: int, i: int) -> bytes:
    """An IPv4/UDP packet of exactly ``size`` bytes (size >= 28)."""
    payload = (i.to_bytes(4, "big") * (size // 4 + 1))[: size - 28]
    udp = (5000).to_bytes(2, "big") + (6000).to_bytes(2, "big") + (size - 20).to_bytes(2, "big")
    udp += b"\x00\x00" + payload
    hdr = bytearray(20)
    hdr[0], hdr[2:4], hdr[8], hdr[9] = 0x45, size.to_bytes(2, "big"), 64, 17
    hdr[12:16], hdr[16:20] = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    return bytes(hdr) + udp


@dataclass
class Row:
    op: str
    alg: str
    mode: str
    size: int | str
    batch: int
    pps: float
    gbps: float
    aead_only_pps: float | None
    ratio: float | None
    aead_starmap_pps: float | None = None
    ratio_starmap: float | None = None
    scapy_pps: float | None = None


def make_table(alg: str, mode: Mode) -> tuple[SaTable, SaState, SaState]:
    t = parse_esp(alg)
    enc_key = os.urandom(t.key_material_len)
    integ_key = os.urandom(t.integ.key_len) if t.integ else b""
    table = SaTable()
    kw = dict(alg=alg, enc_key=enc_key, integ_key=integ_key, mode=mode)
    out = table.install(SaRecord(spi=0x1001, direction=Direction.OUT, local_addr=LOCAL,
                                 remote_addr=REMOTE, **kw))  # type: ignore[arg-type]
    inb = table.install(SaRecord(spi=0x1001, direction=Direction.IN, local_addr=REMOTE,
                                 remote_addr=LOCAL, **kw))  # type: ignore[arg-type]
    return table, out, inb


def timed(fn: Callable[[], None], prep: Callable[[], None], seconds: float,
          batch: int = BATCH) -> float:
    """Packets per second of ``fn`` over batches, ``prep`` run untimed before each."""
    spent, batches = 0.0, 0
    while spent < seconds:
        prep()
        t0 = time.perf_counter()
        fn()
        spent += time.perf_counter() - t0
        batches += 1
    return batches * batch / spent


class BareLoop:
    """The same AEAD calls over the same packets, every argument prepared beforehand.

    Its input buffer is refilled before each batch (untimed), as the codec's is, so both
    read freshly written packets.
    """

    def __init__(self, sa: SaState, op: str, lengths: list[int], batch: int) -> None:
        self.holder = Batch(batch)
        self.holder.load([bytes(ln) for ln in lengths])
        mv = memoryview(self.holder.data)  # type: ignore[arg-type]
        # Decryption in place would destroy the input for the next round: write elsewhere.
        out_mv = memoryview(np.zeros_like(self.holder.data))  # type: ignore[arg-type]
        aead = sa.aead_encrypt_into.__self__  # type: ignore[union-attr]
        self.args: list[tuple[bytes, memoryview, memoryview, memoryview]] = []
        for i, ln in enumerate(lengths):
            off = int(self.holder.meta["offset"][i])
            nonce = sa.salt + os.urandom(8)
            aad = mv[off - 16 : off - 8]
            if op == "encap":
                self.args.append((nonce, mv[off : off + ln], aad, mv[off : off + ln + 16]))
            else:
                # Valid ciphertext and tag, so decryption does the full work.
                ct = aead.encrypt(nonce, bytes(ln), bytes(aad))
                self.holder.data[off : off + ln + 16] = np.frombuffer(ct, dtype=np.uint8)
                self.args.append((nonce, mv[off : off + ln + 16], aad, out_mv[off : off + ln]))
        fn = sa.aead_encrypt_into if op == "encap" else sa.aead_decrypt_into
        assert fn is not None
        self.fn = fn
        self.source = self.holder.data.copy()

    def prep(self) -> None:
        np.copyto(self.holder.data, self.source)

    def for_loop(self) -> None:
        """The bare loop the ratio is defined against: a plain Python ``for``."""
        fn = self.fn
        for nonce, data, aad, out in self.args:
            fn(nonce, data, aad, out)

    def starmap(self) -> None:
        """The same calls driven from C, as the codec drives them: a stricter ceiling."""
        _consume(starmap(self.fn, self.args))


def scapy_rate(alg: str, mode: Mode, packets: list[bytes], key: bytes) -> float | None:
    try:
        from scapy.layers.inet import IP
        from scapy.layers.ipsec import ESP, SecurityAssociation
    except ImportError:
        return None
    names = {"aes128gcm16": "AES-GCM", "aes256gcm16": "AES-GCM",
             "chacha20poly1305": "CHACHA20-POLY1305"}
    if alg not in names:
        return None
    kw = {"tunnel_header": IP(src=str(LOCAL), dst=str(REMOTE))} if mode is Mode.TUNNEL else {}
    sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo=names[alg], crypt_key=key, **kw)
    sample = [IP(p) for p in packets[:64]]
    t0 = time.perf_counter()
    for p in sample:
        sa.encrypt(p)
    return len(sample) / (time.perf_counter() - t0)


def bench_one(alg: str, mode: Mode, size: int | str, seconds: float, rounds: int,
              with_scapy: bool, batch: int = BATCH) -> list[Row]:
    table, out_sa, in_sa = make_table(alg, mode)
    codec = EspCodec(table)
    rng = np.random.default_rng(1)

    def sizes() -> list[int]:
        if size == "mixed":
            return [int(x) for x in rng.integers(64, 1401, batch)]
        return [int(size)] * batch

    template_in = Batch(batch)
    template_in.load([inner_packet(s, i) for i, s in enumerate(sizes())], sa=out_sa.index)
    work = Batch(batch)
    template_out = Batch(batch)

    def prep_encap() -> None:
        if size == "mixed":  # new sizes every batch: no slot geometry repeats
            template_in.load([inner_packet(s, i) for i, s in enumerate(sizes())],
                             sa=out_sa.index)
        work.copy_from(template_in)
        table.assign_sequence(work)

    def refresh_wire() -> None:
        """The codec's own output, re-laid at slot headroom: the decap input."""
        prep_encap()
        codec.encap(work)
        template_out.load(work.packets(), sa=0)
        template_out.meta["seq"][:batch] = work.meta["seq"][:batch]

    def prep_decap() -> None:
        if size == "mixed":
            refresh_wire()
        work.copy_from(template_out)
        # Steady state: the window ends just before this batch's first number.
        in_sa.replay = ReplayWindow(in_sa.record.replay_window, in_sa.record.esn)
        in_sa.replay.top = int(work.meta["seq"][0]) - 1

    refresh_wire()
    wire_bytes = int(template_out.meta["length"][:batch].sum())
    inner_bytes = int(template_in.meta["length"][:batch].sum())
    t = parse_esp(alg)
    payload = [int(x) - (20 if mode is Mode.TRANSPORT else 0)
               for x in template_in.meta["length"][:batch]]
    plaintext = [-(-(ln + 2) // 4) * 4 for ln in payload]  # padded as the codec pads
    rows = []
    for op, fn, prep in (("encap", lambda: codec.encap(work), prep_encap),
                         ("decap", lambda: codec.decap(work), prep_decap)):
        prep()
        fn()
        assert work.verdict_counts() == {}, work.verdict_counts()
        bare = BareLoop(out_sa if op == "encap" else in_sa, op, plaintext, batch) \
            if t.is_aead else None
        codec_pps, loop_pps, star_pps, ratios, star_ratios = [], [], [], [], []
        for _ in range(rounds):
            c = timed(fn, prep, seconds / rounds, batch)
            codec_pps.append(c)
            if bare is not None:
                b = timed(bare.for_loop, bare.prep, seconds / rounds, batch)
                b2 = timed(bare.starmap, bare.prep, seconds / rounds, batch)
                loop_pps.append(b)
                star_pps.append(b2)
                ratios.append(c / b)
                star_ratios.append(c / b2)
        pps = statistics.median(codec_pps)
        nbytes = inner_bytes if op == "encap" else wire_bytes
        median = statistics.median
        rows.append(Row(
            op=op, alg=alg, mode=mode.name.lower(), size=size, batch=batch, pps=pps,
            gbps=pps * (nbytes / batch) * 8 / 1e9,
            aead_only_pps=median(loop_pps) if loop_pps else None,
            ratio=median(ratios) if ratios else None,
            aead_starmap_pps=median(star_pps) if star_pps else None,
            ratio_starmap=median(star_ratios) if star_ratios else None,
            scapy_pps=(scapy_rate(alg, mode, template_in.packets(), out_sa.record.enc_key)
                       if with_scapy and op == "encap" and size != "mixed" else None),
        ))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--algs", default="aes128gcm16,aes256gcm16,chacha20poly1305,aes128-sha256,"
                                      "null-sha256")
    ap.add_argument("--sizes", default="64,512,1400,mixed")
    ap.add_argument("--modes", default="tunnel,transport")
    ap.add_argument("--seconds", type=float, default=1.0, help="per op and row, both sides")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=BATCH, help="packets per batch")
    ap.add_argument("--no-scapy", action="store_true")
    ap.add_argument("--out", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    rows: list[Row] = []
    if not args.json:
        print(f"{'op':6} {'alg':17} {'mode':9} {'size':>6} {'pps':>10} {'Gbit/s':>7} "
              f"{'aead-only':>10} {'ratio':>6} {'starmap':>10} {'ratio':>6} {'scapy pps':>9}")
    for alg in args.algs.split(","):
        for mode_name in args.modes.split(","):
            mode = Mode[mode_name.upper()]
            for s in args.sizes.split(","):
                size: int | str = s if s == "mixed" else int(s)
                for row in bench_one(alg, mode, size, args.seconds, args.rounds,
                                     not args.no_scapy, args.batch):
                    rows.append(row)
                    if args.json:
                        print(json.dumps(row.__dict__), flush=True)
                    else:
                        ao = f"{row.aead_only_pps:10.0f}" if row.aead_only_pps else f"{'-':>10}"
                        ra = f"{row.ratio:6.3f}" if row.ratio else f"{'-':>6}"
                        sm = f"{'-':>10} {'-':>6}"
                        if row.aead_starmap_pps and row.ratio_starmap:
                            sm = f"{row.aead_starmap_pps:10.0f} {row.ratio_starmap:6.3f}"
                        sc = f"{row.scapy_pps:9.0f}" if row.scapy_pps else f"{'':>9}"
                        print(f"{row.op:6} {row.alg:17} {row.mode:9} {row.size!s:>6} "
                              f"{row.pps:10.0f} {row.gbps:7.3f} {ao} {ra} {sm} {sc}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
