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
