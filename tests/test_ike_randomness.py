"""controller/ike/randomness.py: the kernel's random bytes, unchanged, a block per call; bytes
taken are not kept; a forked child never repeats its parent's bytes."""

from __future__ import annotations

import os

import pytest

from controller.daemon import IkeDaemon
from controller.ike.randomness import BLOCK, RandomPool


class Source:
    """A counting stand-in for os.urandom: distinct, predictable bytes."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.given = b""

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        out = bytes((len(self.given) + k) % 251 for k in range(n))
        self.given += out
        return out


def test_draws_are_the_sources_bytes_in_order_one_call_per_block() -> None:
    source = Source()
    pool = RandomPool(source)
    draws = [pool(n) for n in (8, 32, 4, 32, 16) * 40]  # 3680 bytes: within one block
    assert source.calls == [BLOCK]
    assert b"".join(draws) == source.given[:sum(map(len, draws))]
    more = [pool(32) for _ in range(20)]  # 13 fit in the 416 bytes left, 7 from a new block
    assert source.calls == [BLOCK, BLOCK]
    assert b"".join(more) == source.given[3680:BLOCK] + source.given[BLOCK:BLOCK + 7 * 32]


def test_taken_bytes_are_zeroed_and_big_draws_go_to_the_source() -> None:
    source = Source()
    pool = RandomPool(source)
    taken = pool(32)
    assert any(taken) and not any(pool._block[:32])  # not kept once handed out
    assert any(pool._block[32:])  # what no one took yet
    big = pool(BLOCK // 4 + 1)
    assert source.calls == [BLOCK, BLOCK // 4 + 1] and len(big) == BLOCK // 4 + 1
    with pytest.raises(ValueError):
        pool(-1)
    with pytest.raises(ValueError):
        RandomPool(lambda n: b"short")(8)


def test_a_forked_child_reads_its_own_block() -> None:
    pool = RandomPool()
    pool(8)  # the parent holds a block now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next draw, to the parent
        try:
            os.write(write, pool(32))
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 32)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child != pool(32)


def test_the_daemon_draws_from_a_pool_unless_given_a_source() -> None:
    assert isinstance(IkeDaemon([], "127.0.0.1").random, RandomPool)
    assert IkeDaemon([], "127.0.0.1", random=os.urandom).random is os.urandom
