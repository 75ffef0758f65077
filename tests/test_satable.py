"""The runtime SA table's inbound index (workers/sa.py): one SPI per batch (the dict) and mixed
SPIs (the sorted arrays, rebuilt lazily) must always agree, across installs and removals."""

from __future__ import annotations

import ipaddress
import random

import numpy as np

from pipeline.satable import Direction, SaRecord
from workers.sa import SaTable

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("192.0.2.2")
ESP = 50


def record(spi: int, direction: Direction = Direction.IN) -> SaRecord:
    return SaRecord(spi=spi, direction=direction, alg="aes128gcm16", local_addr=A,
                    remote_addr=B, enc_key=bytes(20))


def lookup(table: SaTable, spis: list[int]) -> list[int | None]:
    idx, found = table.lookup_inbound(ESP, np.array(spis, dtype=np.uint32))
    return [int(i) if f else None for i, f in zip(idx, found, strict=True)]


def test_mixed_and_single_spi_lookups_agree_through_churn() -> None:
    rng = random.Random(7)
    table = SaTable()
    model: dict[int, list[int]] = {}  # spi -> indices, newest last (the oracle)
    live: dict[int, int] = {}  # index -> spi
    for step in range(600):
        if live and rng.random() < 0.4:
            index = rng.choice(list(live))
            table.remove(index)
            model[live[index]].remove(index)
            del live[index]
        else:
            index = rng.randrange(64)
            spi = 0x100 + rng.randrange(40)  # few SPIs: duplicates happen
            if index in live:
                model[live[index]].remove(index)
            table.install(record(spi), index)
            model.setdefault(spi, []).append(index)
            live[index] = spi
        spis = [0x100 + rng.randrange(40) for _ in range(rng.choice((1, 5, 32)))]
        want = [model[s][-1] if model.get(s) else None for s in spis]
        assert lookup(table, spis) == want, step
        for s in set(spis):  # a whole batch on one SPI takes the dict path
            assert lookup(table, [s, s]) == [want[spis.index(s)]] * 2
            assert table.lookup_one(ESP, s) == ((want[spis.index(s)], True)
                                                if want[spis.index(s)] is not None
                                                else (0, False))


def test_outbound_sas_are_not_in_the_inbound_index() -> None:
    table = SaTable()
    table.install(record(0x1001, Direction.OUT), 0)
    table.install(record(0x2001), 1)
    assert lookup(table, [0x1001, 0x2001]) == [None, 1]
    table.remove(1)
    assert lookup(table, [0x2001, 0x1001]) == [None, None]


def test_sequence_blocks_for_a_batch_of_many_sas() -> None:
    """Each SA's passing packets get its next numbers in batch order (DESIGN §4), whatever
    the mix of SAs in the batch; dropped packets get none; an SA short of numbers gets what
    is left and 0 (SEQ_OVERFLOW) for the rest."""
    from pipeline.batch import Batch

    rng = random.Random(3)
    table = SaTable()
    for i in range(12):
        table.install(record(0x100 + i, Direction.OUT), i)
    expected_next = {i: 1 for i in range(12)}
    for round_ in range(30):
        n = rng.randrange(1, 200)
        batch = Batch.for_packets([bytes(40)] * n)
        sa_of = [rng.randrange(12) if round_ % 3 else 5 for _ in range(n)]
        batch.meta["sa"][:n] = sa_of
        dropped = {k for k in range(n) if rng.random() < 0.1}
        for k in dropped:
            batch.meta["verdict"][k] = 3
            batch.meta["seq"][k] = 777
        table.assign_sequence(batch)
        for k in range(n):
            if k in dropped:
                assert int(batch.meta["seq"][k]) == 777
                continue
            assert int(batch.meta["seq"][k]) == expected_next[sa_of[k]], (round_, k)
            expected_next[sa_of[k]] += 1
    sa = table[7]
    assert sa is not None
    sa.seq_out = sa.seq_limit - 2  # two numbers left
    batch = Batch.for_packets([bytes(40)] * 6)
    batch.meta["sa"][:6] = [7, 3, 7, 7, 3, 7]
    table.assign_sequence(batch)
    assert batch.meta["seq"][[0, 2, 3, 5]].tolist() == [sa.seq_limit - 1, sa.seq_limit, 0, 0]
    assert batch.meta["seq"][[1, 4]].tolist() == [expected_next[3], expected_next[3] + 1]
