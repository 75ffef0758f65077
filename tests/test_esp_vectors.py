"""ESP codec (workers/esp.py) against published ESP packets (tests/rfc_vectors.py).

- RFC 7634 Appendix A.1: ChaCha20-Poly1305, tunnel mode, IPv4 in IPv4, the whole wire packet.
- draft-mcgrew-gcm-test-01: AES-GCM ESP packets (SPI onward), 32-bit and extended sequence
  numbers. The draft's plaintexts carry Next Header 1 whatever they hold, so they are decapped
  in transport mode behind an IPv4 header built here, and the result compared with the
  plaintext minus its ESP trailer; a Next Header of 4/41 would select tunnel mode and 59 a
  dummy packet (RFC 4303 §2.6).

The transcription of the vectors is checked against plain primitives in
tests/test_rfc_vectors_primitives.py, so a failure here is the codec's.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest

from pipeline.batch import Batch, Verdict
from pipeline.satable import Direction, Mode, Protocol, SaRecord
from tests import rfc_vectors as rv
from tests.esp_support import ipv4_checksum_ok, outer_ip, verdicts
from workers.esp import EspCodec
from workers.sa import SaTable

OUR_ADDR = ipaddress.ip_address("203.0.113.5")
PEER_ADDR = ipaddress.ip_address("203.0.113.153")


# --------------------------------------------------------------------------- RFC 7634
def _rfc7634_sa(sas: SaTable, replay_window: int = 64) -> int:
    rec = SaRecord(spi=rv.RFC7634_ESP_SPI, direction=Direction.IN, alg="chacha20poly1305",
                   local_addr=OUR_ADDR, remote_addr=PEER_ADDR, protocol=Protocol.ESP,
                   mode=Mode.TUNNEL, enc_key=rv.RFC7634_ESP_KEYMAT,
                   replay_window=replay_window)
    return sas.install(rec).index


def _decap(sas: SaTable, packets: list[bytes]) -> Batch:
    batch = Batch.for_packets(packets)
    EspCodec(sas).decap(batch)
    return batch


def test_rfc7634_appendix_a_decap() -> None:
    sas = SaTable()
    idx = _rfc7634_sa(sas)
    batch = _decap(sas, [rv.RFC7634_ESP_OUTER_PACKET])
    assert verdicts(batch) == [Verdict.PASS]
    assert batch.packet(0) == rv.RFC7634_ESP_INNER_PACKET
    assert int(batch.meta["seq"][0]) == rv.RFC7634_ESP_SEQ == 5
    assert int(batch.meta["sa"][0]) == idx
    state = sas[idx]
    assert state is not None
    assert (state.packets, state.bytes) == (1, len(rv.RFC7634_ESP_INNER_PACKET))
    # A second copy is a replay (RFC 4303 §3.4.3).
    assert verdicts(_decap(sas, [rv.RFC7634_ESP_OUTER_PACKET])) == [Verdict.REPLAY]


@pytest.mark.parametrize(("top", "expected"), [
    (0, Verdict.PASS),  # fresh SA
    (4, Verdict.PASS),  # right of the window
    (5 + 64 - 1, Verdict.PASS),  # 5 is the window's leftmost number, not yet seen
    (5 + 64, Verdict.REPLAY),  # 5 just fell off the left edge
    (1 << 20, Verdict.REPLAY),
])
def test_rfc7634_window_edges(top: int, expected: Verdict) -> None:
    sas = SaTable()
    idx = _rfc7634_sa(sas)
    state = sas[idx]
    assert state is not None
    state.replay.top = top
    batch = _decap(sas, [rv.RFC7634_ESP_OUTER_PACKET])
    assert verdicts(batch) == [expected]
    if expected is Verdict.PASS:
        assert batch.packet(0) == rv.RFC7634_ESP_INNER_PACKET
        assert state.replay.top == max(top, 5)


def test_rfc7634_wrong_key_or_salt_fails() -> None:
    for keymat in (rv.RFC7634_ESP_KEYMAT[:-1] + b"\0", b"\0" + rv.RFC7634_ESP_KEYMAT[1:]):
        sas = SaTable()
        sas.install(SaRecord(spi=rv.RFC7634_ESP_SPI, direction=Direction.IN,
                             alg="chacha20poly1305", local_addr=OUR_ADDR,
                             remote_addr=PEER_ADDR, enc_key=keymat))
        assert verdicts(_decap(sas, [rv.RFC7634_ESP_OUTER_PACKET])) == [Verdict.INTEGRITY]


def test_rfc7634_outer_packet_is_the_esp_packet() -> None:
    """The wire packet is the published outer header + ESP packet (a transcription guard)."""
    assert rv.RFC7634_ESP_OUTER_PACKET == rv.RFC7634_ESP_OUTER_IP_HEADER + rv.RFC7634_ESP_PACKET
    assert ipv4_checksum_ok(rv.RFC7634_ESP_OUTER_IP_HEADER)


# --------------------------------------------------------------------------- draft-mcgrew
def _gcm_alg(key: bytes) -> str:
    return {16: "aes128gcm16", 24: "aes192gcm16", 32: "aes256gcm16"}[len(key)]


def _esp_packet(vector: dict[str, object]) -> bytes:
    if "packet" in vector:
        return vector["packet"]  # type: ignore[return-value]
    # The unnumbered vectors give the parts: SPI | low 32 bits of seq | IV | ctext+tag.
    return (struct.pack("!II", vector["spi"], vector["seq"] & 0xFFFFFFFF)  # type: ignore[operator]
            + vector["iv"] + vector["ciphertext_with_icv"])  # type: ignore[operator]


MCGREW = [pytest.param(v, id=v["source"].split(" ", 1)[1].replace(" ", "-")[:40])
          for v in rv.MCGREW_GCM_ESP_VECTORS]
MCGREW += [pytest.param(v, id=f"unnumbered-{k}")
           for k, v in enumerate(rv.MCGREW_GCM_ESP_UNNUMBERED_VECTORS)]


@pytest.mark.parametrize("vector", MCGREW)
def test_mcgrew_gcm_decap(vector: dict[str, object]) -> None:
    key, salt, spi, seq, esn = (vector["key"], vector["salt"], vector["spi"], vector["seq"],
                                vector["esn"])
    assert isinstance(key, bytes) and isinstance(salt, bytes) and isinstance(seq, int)
    assert isinstance(spi, int)
    plaintext = vector["plaintext"]
    assert isinstance(plaintext, bytes)
    pad_len, next_header = plaintext[-2], plaintext[-1]
    body = plaintext[: -2 - pad_len]
    wire = outer_ip(4, PEER_ADDR, OUR_ADDR, _esp_packet(vector))

    if spi < 256:
        # RFC 4303 §2.1: SPI 0 (test case 4) is reserved and never names an SA; an SaRecord
        # refuses it, and the data plane finds none.
        sas = SaTable()
        assert verdicts(_decap(sas, [wire])) == [Verdict.NO_SA]
        return
    mode = Mode.TUNNEL if next_header in (4, 41) else Mode.TRANSPORT
    sas = SaTable()
    state = sas.install(SaRecord(spi=spi, direction=Direction.IN, alg=_gcm_alg(key),
                                 local_addr=OUR_ADDR, remote_addr=PEER_ADDR, mode=mode,
                                 enc_key=key + salt, esn=bool(esn)))
    # The receiver has seen the number before this one: with ESN it infers the high half
    # from that (RFC 4303 Appendix A2.2); the draft's numbers go up to 2^64 - 1.
    state.replay.top = seq - 1
    batch = _decap(sas, [wire])
    if next_header == 59:
        assert verdicts(batch) == [Verdict.DUMMY]
        return
    assert verdicts(batch) == [Verdict.PASS]
    assert int(batch.meta["seq"][0]) == seq
    assert state.replay.top == seq
    out = batch.packet(0)
    if mode is Mode.TUNNEL:
        assert out == body
        return
    # Transport: the outer header now carries the payload's protocol (RFC 4303 §3.4.4).
    assert out[20:] == body
    assert out[9] == next_header
    assert struct.unpack("!H", out[2:4])[0] == len(out) == 20 + len(body)
    assert ipv4_checksum_ok(out[:20])
    assert out[12:20] == wire[12:20]


@pytest.mark.parametrize("vector", MCGREW[:3])
def test_mcgrew_gcm_tampered(vector: dict[str, object]) -> None:
    """The same packets with their last (tag) byte flipped do not verify."""
    spi, key, salt, seq = vector["spi"], vector["key"], vector["salt"], vector["seq"]
    assert isinstance(spi, int) and isinstance(key, bytes) and isinstance(salt, bytes)
    assert isinstance(seq, int)
    esp = bytearray(_esp_packet(vector))
    esp[-1] ^= 0x80
    sas = SaTable()
    state = sas.install(SaRecord(spi=spi, direction=Direction.IN, alg=_gcm_alg(key),
                                 local_addr=OUR_ADDR, remote_addr=PEER_ADDR,
                                 mode=Mode.TRANSPORT, enc_key=key + salt,
                                 esn=bool(vector["esn"])))
    state.replay.top = seq - 1
    assert verdicts(_decap(sas, [outer_ip(4, PEER_ADDR, OUR_ADDR, bytes(esp))])) == [
        Verdict.INTEGRITY]
    assert state.replay.top == seq - 1  # RFC 4303 §3.4.3: only verified packets move it


def test_mcgrew_vectors_mixed_in_one_batch() -> None:
    """Every decappable vector in one batch: several SAs, ESN and not, GCM-128/192/256."""
    sas = SaTable()
    wires, bodies = [], []
    for vector in rv.MCGREW_GCM_ESP_VECTORS:
        spi, key, salt, seq = vector["spi"], vector["key"], vector["salt"], vector["seq"]
        if spi < 256 or any(spi == s.record.spi for s in sas):
            continue
        state = sas.install(SaRecord(spi=spi, direction=Direction.IN, alg=_gcm_alg(key),
                                     local_addr=OUR_ADDR, remote_addr=PEER_ADDR,
                                     mode=Mode.TRANSPORT, enc_key=key + salt,
                                     esn=vector["esn"], replay_window=0))
        state.replay.top = seq - 1
        plaintext = vector["plaintext"]
        wires.append(outer_ip(4, PEER_ADDR, OUR_ADDR, vector["packet"]))
        bodies.append(plaintext[: -2 - plaintext[-2]])
    assert len(wires) >= 8
    batch = _decap(sas, wires)
    assert verdicts(batch) == [Verdict.PASS] * len(wires)
    assert [p[20:] for p in batch.packets()] == bodies
