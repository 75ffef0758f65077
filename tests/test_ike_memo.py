"""controller/ike/memo.py and what uses it: results kept by the identity of immutable inputs
(the responder's choice of proposal, its narrowing, the bytes of its answer's transforms and
selectors), checked against the same work done afresh."""

from __future__ import annotations

import gc
import weakref

from controller.ike import ike_sa, payloads, proposals
from controller.ike.buffer import Buffer
from controller.ike.constants import PayloadType
from controller.ike.ike_sa import IkeSa
from controller.ike.memo import IdentityMemo
from controller.ike.message import parse_message
from controller.ike.payloads import SaPayload, TsiPayload, TsrPayload, push_payload_body
from tests.test_ike_sa import configs, seeded


class Box:
    """An object that can be weakly referenced (tuples cannot)."""


def test_identity_not_equality_and_the_extra_key() -> None:
    memo: IdentityMemo[str] = IdentityMemo()
    a, b = (1, 2, 3), tuple([1, 2, 3])  # equal, not the same object
    assert a == b and a is not b
    memo.put((a,), "a")
    assert memo.get((a,)) == "a" and memo.get((b,)) is None
    assert memo.get((a,), "other") is None  # the extra key is part of the key
    memo.put((a,), "a-other", "other")
    assert memo.get((a,)) == "a" and memo.get((a,), "other") == "a-other"


def test_an_input_stays_alive_while_remembered_and_the_memo_is_bounded() -> None:
    memo: IdentityMemo[int] = IdentityMemo(limit=4)
    box = Box()
    ref = weakref.ref(box)
    memo.put((box,), 1)
    del box
    gc.collect()
    assert ref() is not None  # its id cannot be reused by another object meanwhile
    for k in range(3):
        memo.put((Box(),), k)
    assert len(memo) == 4
    memo.put((Box(),), 9)  # full: emptied, then this one
    assert len(memo) == 1
    gc.collect()
    assert ref() is None  # forgotten, and freed


def exchange_requests(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` initiators' IKE_SA_INIT request and (plaintext-equal) IKE_AUTH request,
    answered by responders: what a concentrator sees from peers with one configuration."""
    i_cfg, r_cfg = configs()
    out = []
    for k in range(count):
        i = IkeSa(i_cfg, initiator=True, local=("192.0.2.1", 500), remote=("192.0.2.2", 500),
                  random=seeded(10 + k))
        r = IkeSa(r_cfg, initiator=False, local=("192.0.2.2", 500), remote=("192.0.2.1", 500),
                  random=seeded(100 + k))
        i.initiate(0.0)
        answers = []
        for _ in range(2):
            for data, _ in i.datagrams_to_send(0.0):
                r.receive_datagram(data, ("192.0.2.1", 500), 0.0)
                for back, _ in r.datagrams_to_send(0.0):
                    answers.append(back)
                    i.receive_datagram(back, ("192.0.2.2", 500), 0.0)
        assert i.state.name == r.state.name == "ESTABLISHED"
        out.append((answers[0], answers[1]))
    return out


def test_peers_with_one_offer_get_one_choice_and_the_same_answer_as_without_memos() -> None:
    for memo in (proposals._chosen_ike, ike_sa._narrowing, payloads._written):
        memo.clear()
    first, second = exchange_requests(2)
    # The second responder's choice and narrowing came from the memos: one offer object
    # (the parser's) for both peers, one entry for its TSi and one for its TSr.
    offers = {id(inputs[0]) for inputs, _ in proposals._chosen_ike._entries.values()}
    assert len(offers) == 1 and len(ike_sa._narrowing) == 2
    # Its IKE_SA_INIT answer's SA payload is byte for byte what a fresh serialization
    # (memos empty) of the same payload writes.
    sa = parse_message(second[0]).find(SaPayload)
    assert sa is not None
    warm = Buffer(capacity=64)
    push_payload_body(warm, sa)
    for memo in (proposals._chosen_ike, ike_sa._narrowing, payloads._written):
        memo.clear()
    cold = Buffer(capacity=64)
    push_payload_body(cold, sa)
    assert warm.data == cold.data


def test_remembered_bytes_of_selectors_and_transforms_are_the_payloads_own() -> None:
    payloads._written.clear()
    i_cfg, _ = configs()
    assert i_cfg.child is not None
    selectors = i_cfg.child.local_ts
    tsi, tsr = TsiPayload(selectors), TsrPayload(selectors)
    fresh = Buffer(capacity=64)
    push_payload_body(fresh, tsi)
    again_i, again_r = Buffer(capacity=64), Buffer(capacity=64)
    push_payload_body(again_i, tsi)  # from the memo
    push_payload_body(again_r, tsr)  # the same selectors in the other payload: same body
    assert fresh.data == again_i.data == again_r.data
    assert payloads._written.get((selectors,), PayloadType.TSI) == fresh.data
    # An empty tuple of transforms and one of selectors are the same object (()): the kind
    # of bytes is part of the key, so neither answers for the other.
    assert payloads._transforms_bytes(()) == b""
    assert payloads._written.get(((),), PayloadType.TSI) is None


def test_the_psk_pad_key_is_rfc_7296_s2_15_for_each_prf() -> None:
    import hashlib
    import hmac
    from dataclasses import replace

    from controller.ike.constants import PrfId

    config, _ = configs()
    rotated = replace(config, psk=config.psk + b"!")  # a new PSK: a new cache
    for prf_id, name in ((PrfId.PRF_HMAC_SHA2_256, "sha256"),
                         (PrfId.PRF_HMAC_SHA2_384, "sha384"),
                         (PrfId.PRF_HMAC_SHA2_512, "sha512")):
        want = hmac.new(config.psk, b"Key Pad for IKEv2", getattr(hashlib, name)).digest()
        assert config.psk_pad_key(prf_id) == want == config.psk_pad_key(prf_id)
        assert rotated.psk_pad_key(prf_id) == hmac.new(
            rotated.psk, b"Key Pad for IKEv2", getattr(hashlib, name)).digest() != want
    assert "pad" not in repr(config) and config == replace(config)  # not part of its value


def test_mutable_inputs_are_never_remembered() -> None:
    """A list could change under the same identity: only tuples are kept."""
    i_cfg, _ = configs()
    assert i_cfg.child is not None
    payloads._written.clear()
    proposals._chosen_ike.clear()
    selectors = list(i_cfg.child.local_ts)
    buf = Buffer(capacity=64)
    payloads._push_traffic_selectors(buf, selectors)  # type: ignore[arg-type]
    transforms = list(proposals.esp_transform_ids(i_cfg.child.esp_proposals[0][0], False))
    assert payloads._transforms_bytes(transforms)  # type: ignore[arg-type]
    offer = SaPayload((payloads.Proposal(1, 1, b"", tuple(transforms)),))
    proposals.select_ike(offer, list(i_cfg.proposals), None)
    assert len(payloads._written) == 0 and len(proposals._chosen_ike) == 0
