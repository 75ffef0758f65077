"""SA proposals: configured proposals to SA payloads and back, and the responder's choice
(RFC 7296 §2.7, §3.3).

Configured proposals come in strongSwan's keyword syntax (IKE: controller/ike/crypto.py
``parse_ike_proposal``; ESP: workers/algorithms.py ``parse_esp``). The responder picks, in
its own configured order (strongSwan's default), the first configured proposal that one of
the offered proposals contains; the answer carries exactly one transform of each type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from controller.ike.constants import (
    DhGroup,
    EncrId,
    EsnId,
    IntegId,
    ProtocolId,
    TransformAttributeType,
    TransformType,
)
from controller.ike.crypto import IkeProposal
from controller.ike.memo import IdentityMemo
from controller.ike.payloads import Proposal, SaPayload, Transform, TransformAttribute
from workers.algorithms import CipherKind, EspTransform

__all__ = [
    "ChosenEsp",
    "ChosenIke",
    "esp_transform_ids",
    "esp_proposals",
    "ike_proposals",
    "select_esp",
    "select_ike",
]

_ESP_ENCR = {
    CipherKind.AEAD_AES_GCM: EncrId.ENCR_AES_GCM_16,
    CipherKind.AEAD_CHACHA20_POLY1305: EncrId.ENCR_CHACHA20_POLY1305,
    CipherKind.AES_CBC: EncrId.ENCR_AES_CBC,
    CipherKind.NULL: EncrId.ENCR_NULL,
}
_INTEG = {
    "sha256": IntegId.AUTH_HMAC_SHA2_256_128,
    "sha384": IntegId.AUTH_HMAC_SHA2_384_192,
    "sha512": IntegId.AUTH_HMAC_SHA2_512_256,
}


def _encr(encr: int, key_bits: int | None) -> Transform:
    attrs = (
        ()
        if key_bits is None
        else (TransformAttribute(TransformAttributeType.KEY_LENGTH, key_bits),)
    )  # RFC 7296 §3.3.5
    return Transform(TransformType.ENCR, encr, attrs)


@lru_cache(maxsize=256)
def esp_transform_ids(
    t: EspTransform, esn: bool, ke_group: int | None = None
) -> tuple[Transform, ...]:
    """The transforms of one ESP proposal for ``t`` (RFC 7296 §3.3.3: ENCR, INTEG unless
    an AEAD, optional KE, ESN). ``ke_group`` is the PFS group of a CREATE_CHILD_SA.
    Cached: one tuple per configured proposal (so an answer's transforms are written once,
    payloads._transforms_bytes)."""
    encr = _ESP_ENCR[t.kind]
    key_bits = (
        None
        if t.kind in (CipherKind.AEAD_CHACHA20_POLY1305, CipherKind.NULL)
        else t.enc_key_len * 8
    )
    out = [_encr(encr, key_bits)]
    if t.integ is not None:
        out.append(Transform(TransformType.INTEG, _INTEG[t.integ.keyword]))
    if ke_group is not None:
        out.append(Transform(TransformType.KE, ke_group))
    out.append(Transform(TransformType.ESN, EsnId.ESN if esn else EsnId.NO_ESN))
    return tuple(out)


@lru_cache(maxsize=256)
def _ike_transforms(p: IkeProposal) -> tuple[Transform, ...]:
    """The transforms of an IKE proposal but its key exchange methods (one per config, not
    per IKE_SA_INIT: transforms are immutable)."""
    transforms = [
        _encr(p.encr, p.suite.key_length_attribute),
        Transform(TransformType.PRF, p.prf),
    ]
    if p.integ is not None:
        transforms.append(Transform(TransformType.INTEG, p.integ))
    return tuple(transforms)


def ike_proposals(configured: Sequence[IkeProposal], spi: bytes = b"") -> SaPayload:
    """The SA payload of an IKE_SA_INIT request (SPI empty: RFC 7296 §3.3.1), or with the
    new initiator SPI that of a CREATE_CHILD_SA rekeying the IKE SA (RFC 7296 §2.18)."""
    proposals = []
    for i, p in enumerate(configured, start=1):
        transforms = (*_ike_transforms(p), *(Transform(TransformType.KE, g) for g in p.ke_groups))
        proposals.append(Proposal(i, ProtocolId.IKE, spi, transforms))
    return SaPayload(tuple(proposals))


def esp_proposals(
    configured: Sequence[tuple[EspTransform, bool]], spi: bytes, ke_group: int | None = None
) -> SaPayload:
    """An ESP SA payload offering each (transform, esn) with our inbound SPI, and with
    ``ke_group`` the KE transform of a CREATE_CHILD_SA with PFS (RFC 7296 §1.3.1)."""
    return SaPayload(
        tuple(
            Proposal(i, ProtocolId.ESP, spi, esp_transform_ids(t, esn, ke_group))
            for i, (t, esn) in enumerate(configured, start=1)
        )
    )


def _contains(offered: Proposal, wanted: Sequence[Transform]) -> bool:
    have = {(t.transform_type, t.transform_id, t.key_length) for t in offered.transforms}
    return all((w.transform_type, w.transform_id, w.key_length) in have for w in wanted)


@dataclass(frozen=True)
class ChosenIke:
    proposal: Proposal  # as it goes into the response: one transform per type
    config: IkeProposal
    group: DhGroup
    peer_spi: bytes = b""  # the offer's SPI: the new initiator SPI of an IKE SA rekey


_chosen_ike: IdentityMemo[ChosenIke | None] = IdentityMemo()


def select_ike(
    offered: SaPayload, configured: Sequence[IkeProposal], ke_group: int | None
) -> ChosenIke | None:
    """The first configured IKE proposal that an offered proposal contains.

    ``ke_group`` is the group of the request's KE payload: a proposal is preferred with
    that group (saving a round trip); otherwise the first acceptable group is chosen and
    the caller answers INVALID_KE_PAYLOAD (RFC 7296 §1.3).

    The same offer object (the parser's, for the same bytes) against the same configured
    tuple gets the same answer object: the choice is made once per distinct offer."""
    return _chosen_ike.get_or((offered, configured),
                              lambda: _select_ike(offered, configured, ke_group), ke_group)


def _select_ike(
    offered: SaPayload, configured: Sequence[IkeProposal], ke_group: int | None
) -> ChosenIke | None:
    candidates: list[ChosenIke] = []
    for config in configured:
        base = _ike_transforms(config)
        for offer in offered.proposals:
            if offer.protocol_id != ProtocolId.IKE or not _contains(offer, base):
                continue
            groups = [
                t.transform_id for t in offer.transforms if t.transform_type == TransformType.KE
            ]
            for group in config.ke_groups:
                if group in groups:
                    chosen = Proposal(
                        offer.number,
                        ProtocolId.IKE,
                        b"",
                        (*base, Transform(TransformType.KE, group)),
                    )
                    candidates.append(ChosenIke(chosen, config, group, offer.spi))
    for c in candidates:
        if c.group == ke_group:
            return c
    return candidates[0] if candidates else None


@dataclass(frozen=True)
class ChosenEsp:
    proposal: Proposal  # one transform per type, with the peer's SPI as offered
    transform: EspTransform
    esn: bool
    peer_spi: bytes


def _ke_ids(proposal: Proposal) -> set[int]:
    return {t.transform_id for t in proposal.transforms if t.transform_type == TransformType.KE}


def _without_ke(proposal: Proposal) -> Proposal:
    transforms = tuple(t for t in proposal.transforms if t.transform_type != TransformType.KE)
    return Proposal(proposal.number, proposal.protocol_id, proposal.spi, transforms)


def select_esp(
    offered: SaPayload,
    configured: Sequence[tuple[EspTransform, bool]],
    ke_group: int | None = None,
    *,
    ignore_ke: bool = False,
) -> ChosenEsp | None:
    """The first configured ESP proposal that an offered one contains.

    ``ke_group`` is our PFS group: an offer must then include it (RFC 7296 §1.3.1); without
    one an offer may list KE only with NONE among them. ``ignore_ke`` is for IKE_AUTH, where
    no key exchange takes place and KE transforms in the offer are disregarded (as
    strongSwan does)."""
    for t, esn in configured:
        wanted = esp_transform_ids(t, esn, None if ignore_ke else ke_group)
        for offer in offered.proposals:
            if offer.protocol_id != ProtocolId.ESP or len(offer.spi) != 4:
                continue
            groups = _ke_ids(offer)
            want = wanted
            if ignore_ke and groups:
                offer = _without_ke(offer)
            elif ke_group is None and groups:
                if DhGroup.NONE not in groups:
                    continue
                want = (*wanted, Transform(TransformType.KE, DhGroup.NONE))
            if _contains(offer, want):
                return ChosenEsp(
                    Proposal(offer.number, ProtocolId.ESP, offer.spi, want), t, esn, offer.spi
                )
    return None


def accepted_esp(
    answer: SaPayload,
    configured: Sequence[tuple[EspTransform, bool]],
    ke_group: int | None = None,
) -> ChosenEsp | None:
    """The initiator's check of a response: exactly one proposal, one we offered (with our
    PFS group ``ke_group``, if any)."""
    if len(answer.proposals) != 1:
        return None
    got = answer.proposals[0]
    for t, esn in configured:
        wanted = esp_transform_ids(t, esn, ke_group)
        if (
            got.protocol_id == ProtocolId.ESP
            and len(got.spi) == 4
            and _contains(got, wanted)
            and len(got.transforms) == len(wanted)
        ):
            return ChosenEsp(got, t, esn, got.spi)
    return None


def accepted_ike(answer: SaPayload, configured: Sequence[IkeProposal]) -> ChosenIke | None:
    if len(answer.proposals) != 1:
        return None
    chosen = select_ike(answer, configured, None)
    if chosen is None or len(answer.proposals[0].transforms) != len(chosen.proposal.transforms):
        return None
    return chosen
