"""The controller's SPD, kept up to date by edits (controller/gateway.py _publish_policies).

Each change of Child SAs or connections sends only the entries it changes. Oracle: the SPD
worked out whole from the same state, the way the controller did before it sent edits:
PROTECT entries per pair of selectors (the newest Child SA's outbound SA) in the order the
pairs came, then a TRAP or DISCARD entry per configured child that is not up, in
configuration order. The data plane's copy (the edits applied) must equal it, in rank order,
after every step of random sequences of installs, removals and reloads.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from typing import Any

import pytest

from controller.config import parse_config
from controller.connections import parse_connection
from controller.gateway import ChildEntry, Gateway, Holders
from pipeline.dispatch import Action, Policy

CONN: dict[str, Any] = {
    "version": 2, "local_addrs": ["192.0.2.1"], "remote_addrs": ["192.0.2.2"],
    "proposals": ["aes128gcm16-prfsha256-x25519"],
    "local": {"auth": "psk", "id": "a.example"}, "remote": {"auth": "psk", "id": "b.example"},
}


def conn_yaml(children: int, trap: bool) -> dict[str, Any]:
    return {**CONN, "children": {
        f"c{k}": {"local_ts": ["10.1.0.0/16"], "remote_ts": [f"10.{64 + k}.0.0/16"],
                  "start_action": "trap" if trap and k % 2 == 0 else "none"}
        for k in range(children)}}


class SpdCopy:
    """A stand-in for the SA publisher: the SPD its edits build (the data plane's)."""

    def __init__(self) -> None:
        self.spd: dict[int, Policy] = {}
        self.edits: list[tuple[int, int]] = []  # (entries put, ranks removed)

    def edit_policies(self, put: dict[int, Policy], removed: Sequence[int] = ()) -> None:
        for rank in removed:
            del self.spd[rank]
        self.spd.update(put)
        self.edits.append((len(put), len(removed)))


def whole_spd(gw: Gateway) -> list[Policy]:
    spd = [Policy(local, remote, sa_index=holders.children[max(holders.children)].index_out)
           for (local, remote), holders in gw._protect.items()]
    for conn in gw.conns.values():
        for spec in conn.children:
            if (conn.name, spec.name) in gw._up:
                continue
            trap = spec.start_action == "trap" or "trap" in (spec.close_action,
                                                             spec.dpd_action)
            spd.append(Policy(spec.local_ts, spec.remote_ts,
                              Action.TRAP if trap else Action.DISCARD,
                              name=f"{conn.name}/{spec.name}"))
    return spd


@pytest.mark.parametrize("seed", range(6))
def test_spd_edits_match_the_whole_spd(seed: int) -> None:
    rng = random.Random(seed)
    cfg = parse_config({"connections": {"site": conn_yaml(3, trap=True)},
                        "secrets": {"ike": [{"secret": "k"}]}}, allowed_cpus=[0])
    gw = Gateway(cfg, start_dataplane=False)
    copy = SpdCopy()
    gw.publisher = copy  # type: ignore[assignment]
    gw._publish_policies()
    assert [copy.spd[r] for r in sorted(copy.spd)] == whole_spd(gw)
    children: list[tuple[ChildEntry, tuple[str, str]]] = []
    next_id = 1
    for _ in range(60):
        edits = len(copy.edits)
        op = rng.random()
        if op < 0.5 or not children:
            # A Child SA up: a client's own /32 (narrowed), or the configured selectors.
            conn, child = "site", f"c{rng.randrange(3)}"
            spec = gw._child_spec(conn, child)
            if spec is None:
                continue
            remote = (ipaddress.ip_network(f"10.{64 + rng.randrange(3)}.0.{rng.randrange(6)}/32"),
                      ) if rng.random() < 0.7 else spec.remote_ts
            entry = ChildEntry.__new__(ChildEntry)
            entry.uniqueid, entry.index_out = next_id, 1000 + next_id
            entry.selectors = (spec.local_ts, remote)
            next_id += 1
            gw._protect.setdefault(entry.selectors, Holders()).add(entry)
            gw._up[(conn, child)] = gw._up.get((conn, child), 0) + 1
            children.append((entry, (conn, child)))
            gw._publish_policies([entry.selectors], [(conn, child)])
        elif op < 0.9:
            entry, pair = children.pop(rng.randrange(len(children)))
            holders = gw._protect[entry.selectors]
            holders.discard(entry.uniqueid)
            if not holders:
                del gw._protect[entry.selectors]
            gw._up[pair] -= 1
            if not gw._up[pair]:
                del gw._up[pair]
            gw._publish_policies([entry.selectors], [pair])
        else:  # a reload: children added or gone
            gw.set_connection(parse_connection("site", conn_yaml(rng.randrange(1, 4),
                                                                 trap=rng.random() < 0.5)))
        assert [copy.spd[r] for r in sorted(copy.spd)] == whole_spd(gw)
        if op < 0.9:  # a Child SA's change sends its entry and its child's TRAP, no more
            assert all(put + removed <= 2 for put, removed in copy.edits[edits:])


@pytest.mark.parametrize("seed", range(4))
def test_holders_give_the_newest_child_sa(seed: int) -> None:
    """Holders.newest against max() over the holders, through adds (in and out of order, as
    a rekey's successor comes back late), discards of the newest and of others, and empty."""
    rng = random.Random(seed)
    holders, present = Holders(), set[int]()
    for _ in range(2000):
        if present and rng.random() < 0.45:
            uid = max(present) if rng.random() < 0.5 else rng.choice(sorted(present))
            holders.discard(uid)
            present.discard(uid)
        else:
            uid = rng.randrange(1, 300)
            entry = ChildEntry.__new__(ChildEntry)
            entry.uniqueid = uid
            holders.add(entry)
            present.add(uid)
        assert len(holders) == len(present)
        if present:
            assert holders.newest().uniqueid == max(present)
