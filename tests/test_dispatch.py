"""The dispatcher's outbound SPD lookup (pipeline/dispatch.py) against a first-match oracle
written from RFC 4301 §4.4.1 (the SPD is ordered; the first entry whose selectors match
decides), on random policy tables with overlapping prefixes, many sites of one shape, and
mixed actions."""

from __future__ import annotations

import ipaddress
import os
import random

import numpy as np
import pytest

from pipeline import dispatch
from pipeline.batch import Batch, Verdict
from pipeline.dispatch import Action, Dispatcher, Policy
from pipeline.region import copy_heads
from pipeline.satable import Direction, SaRecord
from workers.sa import SaTable

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")


def packet(src: str, dst: str, version: int = 4) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if version == 4:
        return bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + s + d + bytes(8)
    return bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + s + d + bytes(8)


def oracle(policies: list[Policy], src: str, dst: str) -> int:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    for i, p in enumerate(policies):
        if any(a in lts and b in rts for lts in p.local_ts for rts in p.remote_ts
               if lts.version == rts.version == a.version):
            return i
    return -1


def net(rng: random.Random, v6: bool = False) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if v6:
        return ipaddress.ip_network(f"2001:db8:{rng.randrange(4):x}::/{rng.choice((48, 64))}",
                                    strict=False)
    prefix = rng.choice((8, 16, 24, 24, 24, 32))
    return ipaddress.ip_network(f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(4)}"
                                f"/{prefix}", strict=False)


@pytest.mark.parametrize("collide", [False, True], ids=["hashed", "colliding"])
@pytest.mark.parametrize("seed", range(8))
def test_first_match_on_random_tables(seed: int, collide: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if collide:  # every IPv6 key hashes alike: those shapes take the row-by-row loop
        monkeypatch.setattr(dispatch, "_hash6",
                            lambda w: np.zeros(w.shape[0], dtype=np.uint64))
    rng = random.Random(seed)
    table = SaTable()
    for i in range(4):
        table.install(SaRecord(spi=0x1000 + i, direction=Direction.OUT, alg="aes128gcm16",
                               local_addr=A, remote_addr=B, enc_key=bytes(20)), i)
    policies = []
    for _ in range(rng.randrange(1, 40)):
        v6 = rng.random() < 0.4
        action = rng.choice((Action.PROTECT, Action.PROTECT, Action.DISCARD, Action.TRAP,
                             Action.BYPASS))
        policies.append(Policy(tuple(net(rng, v6) for _ in range(rng.randrange(1, 3))),
                               tuple(net(rng, v6) for _ in range(rng.randrange(1, 3))),
                               action, rng.randrange(4), name=f"p{len(policies)}"))
    dispatcher = Dispatcher(table, policies)
    pairs = []
    for _ in range(200):
        if rng.random() < 0.2:
            pairs.append((f"2001:db8:{rng.randrange(4):x}::{rng.randrange(9)}",
                          f"2001:db8:{rng.randrange(4):x}::{rng.randrange(9)}", 6))
        else:
            pairs.append((f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(6)}",
                          f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(6)}", 4))
    check(dispatcher, policies, pairs)
    # The SPD changes as the controller sends it: the same Policy objects mostly, reordered,
    # some gone, some new. What the dispatcher kept per policy must not outlive its place.
    rng.shuffle(policies)
    del policies[: len(policies) // 4]
    policies += [Policy((net(rng),), (net(rng),), Action.PROTECT, rng.randrange(4))
                 for _ in range(rng.randrange(1, 10))]
    rng.shuffle(policies)
    dispatcher.trapped.clear()
    dispatcher.set_policies(policies)
    check(dispatcher, policies, pairs)


@pytest.mark.parametrize("weak_hash", [False, True], ids=["hash", "colliding-hash"])
@pytest.mark.parametrize("seed", range(8))
def test_edits_keep_the_first_match_of_the_ranked_spd(seed: int, weak_hash: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The SPD as the controller changes it, entry by entry (``edit_policies``: put and
    removed by rank, the rest untouched): after each edit the dispatcher answers as the
    first-match oracle over the entries in rank order, by the row-by-row path and, for a
    large edit, by the rebuild. Clients' /32s and /128s make shapes of many rows (IPv6:
    searched by hash, its rows inserted and deleted one by one); with a hash of a few
    values, rows collide and shapes move between the hashed and row-by-row searches."""
    if weak_hash:
        monkeypatch.setattr(dispatch, "_hash6", lambda words: words[:, 3] & np.uint64(7))
    rng = random.Random(seed)
    table = SaTable()
    for i in range(4):
        table.install(SaRecord(spi=0x100 + i, direction=Direction.OUT, alg="aes128gcm16",
                               local_addr=A, remote_addr=B, enc_key=bytes(20)), i)

    def policy() -> Policy:
        if rng.random() < 0.4:  # a client's: its own /32, all of one shape
            client = ipaddress.ip_network(f"10.{rng.randrange(3)}.{rng.randrange(4)}."
                                          f"{rng.randrange(6)}/32")
            return Policy((ipaddress.ip_network("10.0.0.0/8"),), (client,), Action.PROTECT,
                          rng.randrange(4))
        if rng.random() < 0.4:  # an IPv6 client's /128, all of one shape too
            client6 = ipaddress.ip_network(f"2001:db8:{rng.randrange(4):x}::{rng.randrange(9)}")
            return Policy((ipaddress.ip_network("2001:db8::/32"),), (client6,),
                          Action.PROTECT, rng.randrange(4))
        v6 = rng.random() < 0.2
        action = rng.choice((Action.PROTECT, Action.PROTECT, Action.DISCARD, Action.TRAP))
        return Policy(tuple(net(rng, v6) for _ in range(rng.randrange(1, 3))),
                      tuple(net(rng, v6) for _ in range(rng.randrange(1, 3))),
                      action, rng.randrange(4))

    spd = {rng.randrange(1 << 40): policy() for _ in range(rng.randrange(0, 20))}
    dispatcher = Dispatcher(table, spd)
    pairs = [(f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(6)}",
              f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(6)}", 4)
             for _ in range(150)]
    pairs += [(f"2001:db8:{rng.randrange(4):x}::{rng.randrange(9)}",
               f"2001:db8:{rng.randrange(4):x}::{rng.randrange(9)}", 6) for _ in range(60)]
    for step in range(16):
        big = step == 6  # more rows than one edit inserts one by one
        removed = rng.sample(sorted(spd), min(len(spd), rng.randrange(0, 4)))
        put = {rng.randrange(1 << 40): policy() for _ in range(300)} if big else {
            rng.choice([*spd, rng.randrange(1 << 40)]) if spd else rng.randrange(1 << 40):
            policy() for _ in range(rng.randrange(0, 4))}
        for rank in rng.sample(sorted(spd), min(len(spd), rng.randrange(0, 3))):
            # a new SA or action for the same selectors (a rekey; a child gone down)
            p = spd[rank]
            put[rank] = Policy(p.local_ts, p.remote_ts, rng.choice(list(Action)),
                               rng.randrange(4))
        removed = [r for r in removed if r not in put] + [rng.randrange(1 << 40)]  # + unknown
        sent_removed = removed + [r for r in put if rng.random() < 0.2]  # put wins
        for rank in removed:
            spd.pop(rank, None)
        spd.update(put)
        dispatcher.trapped.clear()
        dispatcher.edit_policies(put, sent_removed)
        ranks = sorted(spd)
        check(dispatcher, [spd[r] for r in ranks], pairs, ranks)


def check(dispatcher: Dispatcher, policies: list[Policy],
          pairs: list[tuple[str, str, int]], ranks: list[int] | None = None) -> None:
    """Each packet's verdict and SA, and the TRAP policies hit, as the oracle says; and
    ``protect_one`` (and the answers it keeps) agrees for each packet alone, twice.
    ``ranks``: each policy's rank (default: its position)."""
    for _ in range(2):
        for s, d, v in pairs:
            want = oracle(policies, s, d)
            protect = want >= 0 and policies[want].action is Action.PROTECT
            got = dispatcher.protect_one(Batch.for_packets([packet(s, d, v)]))
            assert got == (policies[want].sa_index if protect else -1), (s, d, want)
    batch = Batch.for_packets([packet(s, d, v) for s, d, v in pairs])
    dispatcher.outbound(batch)
    for k, (s, d, _) in enumerate(pairs):
        want = oracle(policies, s, d)
        protect = want >= 0 and policies[want].action is Action.PROTECT
        verdict = int(batch.meta["verdict"][k])
        assert verdict == (Verdict.PASS if protect else Verdict.POLICY), (k, s, d, want)
        if protect:
            assert int(batch.meta["sa"][k]) == policies[want].sa_index
    trapped = {oracle(policies, s, d) for s, d, _ in pairs}
    rank = ranks or list(range(len(policies)))
    assert dispatcher.trapped == {rank[i] for i in trapped
                                  if i >= 0 and policies[i].action is Action.TRAP}
    # The same packets where a reader left them (pipeline/region.py): the lookup reads
    # their addresses in place, and answers as it does for whole packets.
    dispatcher.trapped.clear()
    in_place, region = in_region([packet(s, d, v) for s, d, v in pairs])
    dispatcher.outbound(in_place, region)
    n = batch.count
    assert in_place.meta["verdict"][:n].tolist() == batch.meta["verdict"][:n].tolist()
    assert in_place.meta["sa"][:n].tolist() == batch.meta["sa"][:n].tolist()
    assert dispatcher.trapped == {rank[i] for i in trapped
                                  if i >= 0 and policies[i].action is Action.TRAP}


def in_region(packets: list[bytes]) -> tuple[Batch, np.ndarray]:
    """A batch of ``packets`` that lie in a region as frames lie in a ring (odd offsets,
    back to back), their slots empty (``head`` 0), the last one ending the region; but
    packet 1 was read whole into its slot (``src`` -1)."""
    starts, at = [], 14
    for p in packets:
        starts.append(at)
        at += -(-(len(p) + 30) // 16) * 16
    starts[-1] = at  # right at the end: an address record would run past it
    region = np.frombuffer(bytearray(os.urandom(at + len(packets[-1]))), dtype=np.uint8)
    for p, s in zip(packets, starts, strict=True):
        region[s : s + len(p)] = np.frombuffer(p, dtype=np.uint8)
    batch = Batch(len(packets))
    batch.data[:] = 0xEE  # whatever a reused buffer holds
    copy_heads(batch, 0, region, np.array(starts, dtype=np.int64),
               np.array([len(p) for p in packets], dtype=np.int64), head=0)
    batch.count, batch.region = len(packets), 0
    if len(packets) > 2:
        off = int(batch.meta["offset"][1])
        batch.data[off : off + len(packets[1])] = np.frombuffer(packets[1], dtype=np.uint8)
        batch.src[1] = -1
    return batch, region


def test_thousands_of_sites_cost_one_search_per_shape() -> None:
    """A concentrator's SPD: one policy per site, all of one shape. Each packet finds its
    site's SA; the lookup does not walk the policies."""
    table = SaTable()
    policies = []
    for i in range(3000):
        table.install(SaRecord(spi=0x1000 + i, direction=Direction.OUT, alg="aes128gcm16",
                               local_addr=A, remote_addr=B, enc_key=bytes(20)), i)
        policies.append(Policy((ipaddress.ip_network("10.0.0.0/16"),),
                               (ipaddress.ip_network(f"172.{16 + i // 256}.{i % 256}.0/24"),),
                               sa_index=i))
    dispatcher = Dispatcher(table, policies)
    sites = list(range(0, 3000, 13))
    batch = Batch.for_packets([packet(f"10.0.1.{i % 250}", f"172.{16 + i // 256}.{i % 256}.9")
                               for i in sites])
    dispatcher.outbound(batch)
    assert batch.meta["sa"][: batch.count].tolist() == sites
    assert not np.count_nonzero(batch.meta["verdict"][: batch.count])
    assert len(dispatcher._shapes4) == 1
