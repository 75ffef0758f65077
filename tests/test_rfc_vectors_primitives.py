"""Self-check of tests/rfc_vectors.py against plain crypto primitives.

These tests do not touch espline.  They re-derive every published vector
with ``cryptography`` (AES-GCM, ChaCha20-Poly1305) and ``hmac`` so that a
transcription error in the constants is caught here rather than blamed on
the codec.
"""

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

try:  # works whether or not tests/ is a package
    from tests import rfc_vectors as rv
except ImportError:  # pragma: no cover - depends on pytest import mode
    import rfc_vectors as rv


# ---------------------------------------------------------------------------
# RFC 7634 Appendix A
# ---------------------------------------------------------------------------


def test_rfc7634_key_material_layout():
    assert len(rv.RFC7634_ESP_KEY) == 32
    assert len(rv.RFC7634_ESP_SALT) == 4
    assert rv.RFC7634_ESP_KEYMAT == rv.RFC7634_ESP_KEY + rv.RFC7634_ESP_SALT
    assert len(rv.RFC7634_ESP_IV) == 8
    assert rv.RFC7634_ESP_NONCE == rv.RFC7634_ESP_SALT + rv.RFC7634_ESP_IV
    assert struct.pack("!II", rv.RFC7634_ESP_SPI, rv.RFC7634_ESP_SEQ) == rv.RFC7634_ESP_AAD


def test_rfc7634_plaintext_is_inner_packet_plus_trailer():
    assert (
        rv.RFC7634_ESP_PLAINTEXT
        == rv.RFC7634_ESP_INNER_PACKET + rv.RFC7634_ESP_PADDING_TRAILER
    )
    assert (
        rv.RFC7634_ESP_PADDING
        + bytes([rv.RFC7634_ESP_PAD_LENGTH, rv.RFC7634_ESP_NEXT_HEADER])
    ) == rv.RFC7634_ESP_PADDING_TRAILER
    assert len(rv.RFC7634_ESP_PADDING) == rv.RFC7634_ESP_PAD_LENGTH
    # RFC 4303 default padding pattern 1, 2, ...
    assert bytes(range(1, rv.RFC7634_ESP_PAD_LENGTH + 1)) == rv.RFC7634_ESP_PADDING
    # inner IPv4 total length field matches the inner packet
    assert struct.unpack("!H", rv.RFC7634_ESP_INNER_PACKET[2:4])[0] == len(
        rv.RFC7634_ESP_INNER_PACKET
    )
    assert len(rv.RFC7634_ESP_PLAINTEXT) % 4 == 0


def test_rfc7634_chacha20poly1305_encrypt():
    aead = ChaCha20Poly1305(rv.RFC7634_ESP_KEY)
    out = aead.encrypt(rv.RFC7634_ESP_NONCE, rv.RFC7634_ESP_PLAINTEXT, rv.RFC7634_ESP_AAD)
    assert out == rv.RFC7634_ESP_CIPHERTEXT + rv.RFC7634_ESP_TAG
    assert out == rv.RFC7634_ESP_CIPHERTEXT_WITH_TAG
    assert (
        aead.decrypt(rv.RFC7634_ESP_NONCE, out, rv.RFC7634_ESP_AAD)
        == rv.RFC7634_ESP_PLAINTEXT
    )


def test_rfc7634_esp_packet_layout():
    pkt = rv.RFC7634_ESP_PACKET
    assert pkt[0:4] == struct.pack("!I", rv.RFC7634_ESP_SPI)
    assert pkt[4:8] == struct.pack("!I", rv.RFC7634_ESP_SEQ)
    assert pkt[8:16] == rv.RFC7634_ESP_IV
    assert pkt[16:-16] == rv.RFC7634_ESP_CIPHERTEXT
    assert pkt[-16:] == rv.RFC7634_ESP_TAG
    assert pkt == rv.RFC7634_ESP_AAD + rv.RFC7634_ESP_IV + rv.RFC7634_ESP_CIPHERTEXT_WITH_TAG


def _ipv4_checksum_ok(header):
    total = 0
    for (word,) in struct.iter_unpack("!H", header):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_rfc7634_outer_packet_layout():
    outer = rv.RFC7634_ESP_OUTER_PACKET
    hdr = rv.RFC7634_ESP_OUTER_IP_HEADER
    assert len(hdr) == 20 and hdr[0] == 0x45
    assert outer[:20] == hdr
    assert outer[20:] == rv.RFC7634_ESP_PACKET
    assert struct.unpack("!H", hdr[2:4])[0] == len(outer)  # total length
    assert hdr[9] == 50  # protocol ESP
    assert _ipv4_checksum_ok(hdr)
    # SPI | seq | IV | ciphertext | tag at their offsets in the wire packet
    assert outer[20:24] == struct.pack("!I", rv.RFC7634_ESP_SPI)
    assert outer[24:28] == struct.pack("!I", rv.RFC7634_ESP_SEQ)
    assert outer[28:36] == rv.RFC7634_ESP_IV
    assert outer[36:-16] == rv.RFC7634_ESP_CIPHERTEXT
    assert outer[-16:] == rv.RFC7634_ESP_TAG


def test_rfc7634_inner_packet_checksum():
    assert _ipv4_checksum_ok(rv.RFC7634_ESP_INNER_PACKET[:20])


# ---------------------------------------------------------------------------
# RFC 4868 section 2.7
# ---------------------------------------------------------------------------

_DIGEST_LEN = {"sha256": 32, "sha384": 48, "sha512": 64}
_TRUNC_LEN = {"sha256": 16, "sha384": 24, "sha512": 32}


def test_rfc4868_vector_counts():
    assert len(rv.RFC4868_PRF_VECTORS) == 18
    assert len(rv.RFC4868_AUTH_VECTORS) == 12
    assert rv.RFC4868_HMAC_VECTORS == rv.RFC4868_PRF_VECTORS + rv.RFC4868_AUTH_VECTORS
    sources = [v["source"] for v in rv.RFC4868_HMAC_VECTORS]
    assert len(set(zip(sources, [v["alg"] for v in rv.RFC4868_HMAC_VECTORS], strict=True))) == 30


@pytest.mark.parametrize(
    "vec", rv.RFC4868_HMAC_VECTORS, ids=lambda v: f"{v['alg']}:{v['source']}"
)
def test_rfc4868_hmac(vec):
    assert set(vec) == {"alg", "key", "data", "mac", "truncated_len", "truncated_mac", "source"}
    assert len(vec["mac"]) == _DIGEST_LEN[vec["alg"]]
    assert hmac.digest(vec["key"], vec["data"], vec["alg"]) == vec["mac"]
    assert hmac.new(vec["key"], vec["data"], getattr(hashlib, vec["alg"])).digest() == vec["mac"]
    if vec["truncated_len"] is None:
        assert vec["truncated_mac"] is None
        assert "2.7.1" in vec["source"]
    else:
        assert "2.7.2" in vec["source"]
        assert vec["truncated_len"] == _TRUNC_LEN[vec["alg"]]
        # authenticator keys are exactly the hash output length
        assert len(vec["key"]) == _DIGEST_LEN[vec["alg"]]
        assert vec["mac"][: vec["truncated_len"]] == vec["truncated_mac"]
        assert (
            hmac.digest(vec["key"], vec["data"], vec["alg"])[: vec["truncated_len"]]
            == vec["truncated_mac"]
        )


def test_rfc4868_auth512_4_erratum():
    printed = rv.RFC4868_AUTH512_4_KEY_AS_PRINTED
    assert len(printed) == 80
    vec = rv.RFC4868_AUTH_VECTORS[-1]
    assert vec["source"].startswith("RFC 4868 §2.7.2 test case AUTH512-4")
    assert vec["key"] == printed[16:]
    assert hmac.digest(printed, vec["data"], "sha512") != vec["mac"]


# ---------------------------------------------------------------------------
# draft-mcgrew-gcm-test-01
# ---------------------------------------------------------------------------

_GCM_KEYS = {
    "source", "key", "salt", "spi", "seq", "esn", "iv", "nonce", "plaintext",
    "aad", "ciphertext_with_icv", "packet", "icv_len",
}


def test_mcgrew_case_numbers():
    assert [v["source"] for v in rv.MCGREW_GCM_ESP_VECTORS] == [
        f"draft-mcgrew-gcm-test-01 Test Case {n}" for n in range(1, 15)
    ]


@pytest.mark.parametrize("vec", rv.MCGREW_GCM_ESP_VECTORS, ids=lambda v: v["source"])
def test_mcgrew_gcm_esp(vec):
    assert set(vec) == _GCM_KEYS
    assert len(vec["key"]) in (16, 24, 32)
    assert len(vec["salt"]) == 4 and len(vec["iv"]) == 8
    assert vec["nonce"] == vec["salt"] + vec["iv"]
    # AAD layout (RFC 4106 section 5)
    if vec["esn"]:
        expected_aad = struct.pack("!IQ", vec["spi"], vec["seq"])
    else:
        assert vec["seq"] < 2**32
        expected_aad = struct.pack("!II", vec["spi"], vec["seq"])
    assert vec["aad"] == expected_aad

    out = AESGCM(vec["key"]).encrypt(vec["salt"] + vec["iv"], vec["plaintext"], vec["aad"])
    assert out == vec["ciphertext_with_icv"]
    assert len(out) == len(vec["plaintext"]) + vec["icv_len"]
    assert (
        AESGCM(vec["key"]).decrypt(vec["nonce"], vec["ciphertext_with_icv"], vec["aad"])
        == vec["plaintext"]
    )

    # ESP packet: SPI | low 32 bits of seq | IV | ciphertext | ICV
    pkt = vec["packet"]
    assert pkt[0:4] == struct.pack("!I", vec["spi"])
    assert pkt[4:8] == struct.pack("!I", vec["seq"] & 0xFFFFFFFF)
    assert pkt[8:16] == vec["iv"]
    assert pkt[16:] == vec["ciphertext_with_icv"]

    # ESP trailer: plaintext ends with pad length and next header, and the
    # padding uses the RFC 4303 default 1, 2, 3, ... pattern
    pt = vec["plaintext"]
    pad_len, next_header = pt[-2], pt[-1]
    assert pad_len <= len(pt) - 2
    assert pt[len(pt) - 2 - pad_len: -2] == bytes(range(1, pad_len + 1))
    assert next_header in (1, 4, 6, 17, 59)


@pytest.mark.parametrize(
    "vec", rv.MCGREW_GCM_ESP_UNNUMBERED_VECTORS, ids=lambda v: f"{v['spi']:08x}"
)
def test_mcgrew_gcm_esp_unnumbered(vec):
    assert vec["esn"]
    aad = struct.pack("!IQ", vec["spi"], vec["seq"])
    out = AESGCM(vec["key"]).encrypt(vec["salt"] + vec["iv"], vec["plaintext"], aad)
    assert out == vec["ciphertext_with_icv"]
