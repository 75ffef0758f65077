"""IKEv2 cryptography: PRFs and prf+, IKE SA and Child SA key derivation, and the
protection of the Encrypted (SK) payload; plus strongSwan-style IKE proposal keywords.

Sans-IO and stateless: nothing here draws randomness or reads a clock. The caller passes
the IV of each SK payload (random for AES-CBC, unique per key for the AEADs) and keeps the
keys. Sources:

* PRFs: RFC 4868 §2.1 (HMAC-SHA2: any key length, output = hash length); prf+: RFC 7296
  §2.13.
* Keys: RFC 7296 §2.14 (IKE SA), §2.17 (Child SA KEYMAT), §2.18 (IKE SA rekey); for the
  AEADs RFC 5282 §7.1 (AES-GCM: SK_e = key || 4-byte salt, no SK_a) and RFC 7634 §3
  (ChaCha20-Poly1305: likewise).
* SK payload: RFC 7296 §3.14 (AES-CBC + HMAC-SHA2, encrypt-then-MAC over the whole
  message), RFC 5282 §3-§5 (AES-GCM: 8-byte IV, nonce = salt || IV, AAD = the message up to
  the IV, 16-byte ICV), RFC 7634 §3 (ChaCha20-Poly1305, same framing).

A message serializer builds the IKE header and the SK generic payload header with their
final lengths (``sk_overhead`` says how long the SK payload body will be), then calls
``encrypt_sk`` with those bytes as the associated data.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from workers.algorithms import (
    INTEG_ALGS,
    INTEG_ALIASES,
    AlgorithmError,
    EspTransform,
    IntegAlg,
)

from .constants import DhGroup, EncrId, IntegId, PrfId
from .errors import InvalidSyntax
from .keyexchange import SUPPORTED_GROUPS

__all__ = [
    "PRF_PLUS_MAX_BLOCKS",
    "SUPPORTED_ENCR",
    "SUPPORTED_INTEG",
    "SUPPORTED_PRF",
    "ChildSaKeys",
    "IkeKeys",
    "IkeProposal",
    "IkeSuite",
    "IntegrityError",
    "SkKeys",
    "SkPaddingError",
    "SkPayloadTooShort",
    "compute_rekey_skeyseed",
    "compute_skeyseed",
    "decrypt_sk",
    "derive_child_sa_keys",
    "derive_ike_sa_keys",
    "encrypt_sk",
    "parse_ike_proposal",
    "prf",
    "prf_output_len",
    "prf_plus",
    "sk_overhead",
]


# -- supported transforms -------------------------------------------------------------------

SUPPORTED_ENCR: frozenset[EncrId] = frozenset(
    {
        EncrId.ENCR_AES_CBC,  # RFC 3602; Key Length attribute 128/192/256 (RFC 7296 §3.3.5)
        EncrId.ENCR_AES_GCM_16,  # RFC 5282: 16-octet ICV; Key Length 128/192/256
        EncrId.ENCR_CHACHA20_POLY1305,  # RFC 7634: 256-bit key, no Key Length attribute
    }
)

# RFC 4868 §2.1 (and RFC 2104 for SHA-1): HMAC takes a key of any length; the PRF output,
# and the preferred key length for SK_d/SK_pi/SK_pr (RFC 7296 §2.14), is the hash length.
_PRF_HASH: dict[PrfId, tuple[str, int]] = {
    # RFC 8247 §2.3 demotes PRF_HMAC_SHA1 (MUST-). Kept so that a peer's proposal can be
    # evaluated and for the CAVS-format KDF test vectors; no proposal keyword selects it.
    PrfId.PRF_HMAC_SHA1: ("sha1", 20),
    PrfId.PRF_HMAC_SHA2_256: ("sha256", 32),
    PrfId.PRF_HMAC_SHA2_384: ("sha384", 48),
    PrfId.PRF_HMAC_SHA2_512: ("sha512", 64),
}

# RFC 4868 §2.1: HMAC-SHA2-xxx-yyy, key length = hash length, ICV truncated to half.
_INTEG: dict[IntegId, IntegAlg] = {
    IntegId.AUTH_HMAC_SHA2_256_128: INTEG_ALGS["sha256"],
    IntegId.AUTH_HMAC_SHA2_384_192: INTEG_ALGS["sha384"],
    IntegId.AUTH_HMAC_SHA2_512_256: INTEG_ALGS["sha512"],
}

AEAD_SALT_LEN = 4  # RFC 5282 §7.1, RFC 7634 §3: last 4 octets of SK_e / KEYMAT
AEAD_IV_LEN = 8  # RFC 5282 §3, RFC 7634 §3
AEAD_ICV_LEN = 16  # ENCR_AES_GCM_16 (RFC 5282 §3); Poly1305 tag (RFC 7634 §3)
AES_BLOCK_LEN = 16  # RFC 3602: the CBC IV and the padding boundary
PAD_LENGTH_LEN = 1  # RFC 7296 §3.14: the Pad Length octet
PRF_PLUS_MAX_BLOCKS = 255  # RFC 7296 §2.13: the counter octet runs 0x01..0xff
IKE_SPI_LEN = 8  # RFC 7296 §3.1

SUPPORTED_PRF: frozenset[PrfId] = frozenset(_PRF_HASH)
SUPPORTED_INTEG: frozenset[IntegId] = frozenset(_INTEG)


# -- PRF and prf+ --------------------------------------------------------------------------


def prf_output_len(prf_id: PrfId) -> int:
    """PRF output length in bytes (= preferred key length, RFC 7296 §2.14, RFC 4868 §2.1)."""
    return _prf_hash(prf_id)[1]


def prf(prf_id: PrfId, key: bytes, data: bytes) -> bytes:
    """prf(K, S) of RFC 7296 §2.13: HMAC with the negotiated hash (RFC 4868 §2.1)."""
    return hmac.digest(key, data, _prf_hash(prf_id)[0])


def prf_plus(prf_id: PrfId, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+(K, S) of RFC 7296 §2.13, truncated to ``length`` bytes.

    T1 = prf(K, S | 0x01), Tn = prf(K, Tn-1 | S | n); prf+ = T1 | T2 | ... The counter is
    one octet, so at most 255 blocks exist: a longer request raises ``ValueError``.
    """
    name, out_len = _prf_hash(prf_id)
    if length < 0:
        raise ValueError(f"prf+ length {length} is negative")
    blocks = -(-length // out_len)
    if blocks > PRF_PLUS_MAX_BLOCKS:
        raise ValueError(
            f"prf+ asked for {length} bytes: more than {PRF_PLUS_MAX_BLOCKS} blocks of "
            f"{out_len} ({PRF_PLUS_MAX_BLOCKS * out_len} bytes), undefined (RFC 7296 §2.13)"
        )
    out = bytearray()
    t = b""
    for n in range(1, blocks + 1):
        t = hmac.digest(key, t + seed + bytes((n,)), name)
        out += t
    return bytes(out[:length])


def _prf_hash(prf_id: PrfId) -> tuple[str, int]:
    try:
        return _PRF_HASH[prf_id]
    except KeyError:
        raise ValueError(f"unsupported PRF transform ID {prf_id!r}") from None


# -- negotiated IKE SA transforms ------------------------------------------------------------


@dataclass(frozen=True)
class IkeSuite:
    """The transforms of one IKE SA: what key derivation and SK protection need.

    ``encr_key_bits`` is the Key Length attribute (RFC 7296 §3.3.5); ChaCha20-Poly1305 has
    a fixed 256-bit key and no attribute. ``integ`` is None exactly for the AEADs
    (RFC 5282 §8: no integrity transform, or NONE, with a combined-mode cipher);
    ``IntegId.NONE`` is normalised to None. Unsupported IDs raise ``ValueError``.
    The derived sizes are computed once per suite (every SK payload asks for them).
    """

    encr: EncrId
    encr_key_bits: int
    prf: PrfId
    integ: IntegId | None

    def __post_init__(self) -> None:
        if self.encr not in SUPPORTED_ENCR:
            raise ValueError(f"unsupported encryption transform ID {self.encr!r}")
        if self.prf not in SUPPORTED_PRF:
            raise ValueError(f"unsupported PRF transform ID {self.prf!r}")
        if self.integ is not None and self.integ != IntegId.NONE:
            if self.integ not in SUPPORTED_INTEG:
                raise ValueError(f"unsupported integrity transform ID {self.integ!r}")
            integ: IntegId | None = IntegId(self.integ)
        else:
            integ = None
        # Plain ints from the wire become the enums, so that ``is`` comparisons hold.
        encr = EncrId(self.encr)
        object.__setattr__(self, "encr", encr)
        object.__setattr__(self, "prf", PrfId(self.prf))
        object.__setattr__(self, "integ", integ)
        if encr is EncrId.ENCR_CHACHA20_POLY1305:
            valid_bits: tuple[int, ...] = (256,)
        else:
            valid_bits = (128, 192, 256)
        if self.encr_key_bits not in valid_bits:
            raise ValueError(
                f"{encr.name}: key length {self.encr_key_bits} bits not in {valid_bits}"
            )
        aead = encr is not EncrId.ENCR_AES_CBC
        if aead and self.integ is not None:
            raise ValueError(f"{encr.name} is an AEAD: no integrity transform (RFC 5282 §8)")
        if not aead and self.integ is None:
            raise ValueError(f"{encr.name} needs an integrity transform (RFC 7296 §3.3)")

    @cached_property
    def is_aead(self) -> bool:
        return self.integ is None

    @cached_property
    def key_length_attribute(self) -> int | None:
        """Value for the Key Length transform attribute, or None where none is sent."""
        return None if self.encr is EncrId.ENCR_CHACHA20_POLY1305 else self.encr_key_bits

    @cached_property
    def encr_key_len(self) -> int:
        """Cipher key length in bytes, salt excluded."""
        return self.encr_key_bits // 8

    @cached_property
    def salt_len(self) -> int:
        return AEAD_SALT_LEN if self.is_aead else 0

    @cached_property
    def sk_e_len(self) -> int:
        """Length of SK_ei / SK_er: key, plus the salt for the AEADs (RFC 5282 §7.1)."""
        return self.encr_key_len + self.salt_len

    @cached_property
    def sk_a_len(self) -> int:
        """Length of SK_ai / SK_ar: the HMAC key (RFC 4868 §2.1.1), 0 for the AEADs."""
        return 0 if self.integ is None else _INTEG[self.integ].key_len

    @cached_property
    def sk_p_len(self) -> int:
        """Length of SK_d, SK_pi, SK_pr: the PRF's preferred key length (RFC 7296 §2.14)."""
        return prf_output_len(self.prf)

    @cached_property
    def iv_len(self) -> int:
        return AEAD_IV_LEN if self.is_aead else AES_BLOCK_LEN

    @cached_property
    def icv_len(self) -> int:
        return AEAD_ICV_LEN if self.integ is None else _INTEG[self.integ].icv_len

    @cached_property
    def block_len(self) -> int:
        """Padding boundary of the encrypted data: the AES block for CBC, none for the
        AEADs (stream modes; RFC 7634 Appendix B sends 0 padding octets)."""
        return 1 if self.is_aead else AES_BLOCK_LEN


# -- keys ------------------------------------------------------------------------------------


def _hidden(name: str, value: bytes) -> str:
    return f"{name}=<{len(value)} bytes>"


@dataclass(frozen=True, eq=False)
class SkKeys:
    """The keys protecting SK payloads in one direction: SK_e (with the salt for the
    AEADs) and SK_a (empty for the AEADs). The repr shows lengths only."""

    sk_e: bytes
    sk_a: bytes
    # The AEAD cipher keyed with SK_e, made on first use: one per IKE SA and direction
    _aead: AESGCM | ChaCha20Poly1305 | None = field(default=None, init=False)

    def __repr__(self) -> str:
        return f"SkKeys({_hidden('sk_e', self.sk_e)}, {_hidden('sk_a', self.sk_a)})"


@dataclass(frozen=True, eq=False)
class IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} of RFC 7296 §2.14.

    ``initiator_to_responder`` / ``responder_to_initiator`` give the SK payload keys of each
    direction, whichever side we are. The repr shows lengths only; equality is identity
    (compare key bytes with ``hmac.compare_digest`` if ever needed).
    """

    sk_d: bytes
    sk_ai: bytes
    sk_ar: bytes
    sk_ei: bytes
    sk_er: bytes
    sk_pi: bytes
    sk_pr: bytes

    @cached_property
    def initiator_to_responder(self) -> SkKeys:
        return SkKeys(self.sk_ei, self.sk_ai)

    @cached_property
    def responder_to_initiator(self) -> SkKeys:
        return SkKeys(self.sk_er, self.sk_ar)

    def __repr__(self) -> str:
        names = ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr")
        return "IkeKeys(" + ", ".join(_hidden(n, getattr(self, n)) for n in names) + ")"


@dataclass(frozen=True, eq=False)
class ChildSaKeys:
    """KEYMAT of one Child SA split per RFC 7296 §2.17: the initiator-to-responder SA's
    encryption then integrity key, then the responder-to-initiator SA's. For the AEADs the
    encryption key material ends with the 4-byte salt and the integrity keys are empty
    (``EspTransform.key_material_len``). The repr shows lengths only."""

    encr_i2r: bytes
    integ_i2r: bytes
    encr_r2i: bytes
    integ_r2i: bytes

    def __repr__(self) -> str:
        names = ("encr_i2r", "integ_i2r", "encr_r2i", "integ_r2i")
        return "ChildSaKeys(" + ", ".join(_hidden(n, getattr(self, n)) for n in names) + ")"


def compute_skeyseed(prf_id: PrfId, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 §2.14).

    ``ni``/``nr`` are the nonce values without payload headers; ``g_ir`` as returned by
    ``keyexchange.shared_secret``. HMAC accepts the variable-length key Ni | Nr as is
    (RFC 4868 §2.1); the fixed-key-length PRF rule of §2.14 does not apply.
    """
    return prf(prf_id, ni + nr, g_ir)


def compute_rekey_skeyseed(
    old_prf_id: PrfId, old_sk_d: bytes, g_ir_new: bytes, ni: bytes, nr: bytes
) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) for a rekeyed IKE SA (RFC 7296 §2.18).

    The PRF is the *old* IKE SA's (the exchange belongs to it); Ni/Nr are the nonces of the
    CREATE_CHILD_SA exchange. Derive the new keys with ``derive_ike_sa_keys`` under the new
    suite and the new SPIs.
    """
    return prf(old_prf_id, old_sk_d, g_ir_new + ni + nr)


def derive_ike_sa_keys(
    suite: IkeSuite, skeyseed: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes
) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr}
    = prf+(SKEYSEED, Ni | Nr | SPIi | SPIr) (RFC 7296 §2.14), with the lengths of ``suite``.
    ``spi_i``/``spi_r`` are the 8-octet SPIs as in the IKE header."""
    for name, spi in (("SPIi", spi_i), ("SPIr", spi_r)):
        if len(spi) != IKE_SPI_LEN:
            raise ValueError(f"{name} must be {IKE_SPI_LEN} bytes, got {len(spi)}")
    p, a, e = suite.sk_p_len, suite.sk_a_len, suite.sk_e_len
    lengths = (p, a, a, e, e, p, p)
    keymat = prf_plus(suite.prf, skeyseed, ni + nr + spi_i + spi_r, sum(lengths))
    parts = _split(keymat, lengths)
    return IkeKeys(*parts)


def derive_child_sa_keys(
    prf_id: PrfId,
    sk_d: bytes,
    ni: bytes,
    nr: bytes,
    transform: EspTransform | IntegAlg,
    g_ir_new: bytes | None = None,
) -> ChildSaKeys:
    """KEYMAT = prf+(SK_d, Ni | Nr), or prf+(SK_d, g^ir (new) | Ni | Nr) with PFS
    (RFC 7296 §2.17), split for ``transform``: an ESP transform of workers.algorithms
    (encryption key material incl. salt, then the integrity key), or for AH an ``IntegAlg``
    (integrity keys only). Ni/Nr are the nonces of the exchange creating the Child SA.
    """
    if isinstance(transform, EspTransform):
        encr_len = transform.key_material_len
        integ_len = 0 if transform.integ is None else transform.integ.key_len
    else:
        encr_len, integ_len = 0, transform.key_len
    # RFC 7296 §2.17: all keys for the initiator-to-responder SA first, encryption before
    # integrity within each.
    lengths = (encr_len, integ_len, encr_len, integ_len)
    seed = (g_ir_new or b"") + ni + nr
    keymat = prf_plus(prf_id, sk_d, seed, sum(lengths))
    return ChildSaKeys(*_split(keymat, lengths))


def _split(data: bytes, lengths: tuple[int, ...]) -> list[bytes]:
    out, pos = [], 0
    for n in lengths:
        out.append(data[pos : pos + n])
        pos += n
    return out


# -- SK payload protection ----------------------------------------------------------------------


class IntegrityError(ValueError):
    """An Encrypted payload failed its integrity check (or is too short to carry one).
    RFC 7296 §2.21: such a message is dropped silently; nothing is sent in response."""


class SkPayloadTooShort(IntegrityError):
    """The SK payload body cannot hold an IV, one block and an ICV: dropped like a bad ICV,
    since it cannot be authenticated. Counted separately (a runt)."""


class SkPaddingError(InvalidSyntax):
    """The SK payload authenticated, but its Pad Length exceeds the decrypted data: the
    authenticated peer sent malformed data (RFC 7296 §3.14), answered with INVALID_SYNTAX."""


def _padding_len(suite: IkeSuite, plaintext_len: int) -> int:
    # RFC 7296 §3.14: payloads | Padding | Pad Length fills a whole number of blocks; the
    # sender SHOULD use the minimum padding.
    return -(plaintext_len + PAD_LENGTH_LEN) % suite.block_len


def sk_overhead(suite: IkeSuite, plaintext_len: int) -> int:
    """Bytes the SK payload body adds to ``plaintext_len`` bytes of inner payloads:
    IV, Padding, Pad Length and ICV. ``len(encrypt_sk(...)) == plaintext_len + sk_overhead``.
    The 4-octet generic payload header of the SK payload is not included."""
    if plaintext_len < 0:
        raise ValueError(f"plaintext length {plaintext_len} is negative")
    return suite.iv_len + _padding_len(suite, plaintext_len) + PAD_LENGTH_LEN + suite.icv_len


def encrypt_sk(
    suite: IkeSuite,
    keys: SkKeys,
    header_and_payload_header: bytes,
    plaintext_inner_payloads: bytes,
    iv: bytes,
) -> bytes:
    """The body of an Encrypted payload: IV || Encrypted(payloads | Padding | Pad Length)
    || ICV (RFC 7296 §3.14).

    ``header_and_payload_header`` is the message from the first octet of the IKE header up
    to the IV, i.e. the IKE header, any unencrypted payloads, and the SK payload's generic
    header, with their final Length fields (``sk_overhead``). It is the AEAD's associated
    data (RFC 5282 §5.1) or, for AES-CBC, the start of the data the ICV covers.
    ``iv`` is ``suite.iv_len`` bytes: random for AES-CBC, unique per key for the AEADs.
    The padding octets are zeros (RFC 7296 §3.14 lets the sender choose them).
    """
    if len(iv) != suite.iv_len:
        raise ValueError(f"IV must be {suite.iv_len} bytes, got {len(iv)}")
    _check_keys(suite, keys)
    pad = _padding_len(suite, len(plaintext_inner_payloads))
    data = plaintext_inner_payloads + bytes(pad) + bytes((pad,))
    if suite.is_aead:
        # RFC 5282 §4 / RFC 7634 §3: nonce = salt (last 4 octets of SK_e) || IV.
        salt = keys.sk_e[-AEAD_SALT_LEN:]
        sealed = _aead(suite, keys).encrypt(salt + iv, data, header_and_payload_header)
        return iv + sealed
    encryptor = Cipher(algorithms.AES(keys.sk_e), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(data) + encryptor.finalize()
    body = iv + ciphertext
    return body + _icv(suite, keys, header_and_payload_header + body)


def decrypt_sk(
    suite: IkeSuite, keys: SkKeys, header_and_payload_header: bytes, body: bytes
) -> bytes:
    """The inner payloads of an Encrypted payload, after checking its ICV.

    ``body`` is the SK payload body (IV || ciphertext || ICV); ``header_and_payload_header``
    as for ``encrypt_sk``, exactly as received. Raises ``IntegrityError`` (the caller drops
    the message silently, RFC 7296 §2.21) or, for an authentic message with a bad Pad
    Length, ``SkPaddingError``.
    """
    _check_keys(suite, keys)
    iv_len, icv_len = suite.iv_len, suite.icv_len
    encrypted_len = len(body) - iv_len - icv_len
    if encrypted_len < PAD_LENGTH_LEN or encrypted_len % suite.block_len:
        raise SkPayloadTooShort(
            f"SK payload body of {len(body)} bytes: no room for IV, encrypted data and ICV"
        )
    iv = body[:iv_len]
    if suite.is_aead:
        salt = keys.sk_e[-AEAD_SALT_LEN:]
        try:
            data = _aead(suite, keys).decrypt(salt + iv, body[iv_len:], header_and_payload_header)
        except InvalidTag:
            raise IntegrityError("SK payload ICV mismatch") from None
    else:
        # RFC 7296 §3.14: the ICV covers the message from the IKE header through the
        # encrypted data; check it before decrypting anything.
        expected = _icv(suite, keys, header_and_payload_header + body[:-icv_len])
        if not hmac.compare_digest(expected, body[-icv_len:]):
            raise IntegrityError("SK payload ICV mismatch")
        decryptor = Cipher(algorithms.AES(keys.sk_e), modes.CBC(iv)).decryptor()
        data = decryptor.update(body[iv_len:-icv_len]) + decryptor.finalize()
    pad = data[-1]
    if pad + PAD_LENGTH_LEN > len(data):
        raise SkPaddingError(f"Pad Length {pad} exceeds the {len(data)} decrypted bytes")
    return data[: len(data) - PAD_LENGTH_LEN - pad]


def _aead(suite: IkeSuite, keys: SkKeys) -> AESGCM | ChaCha20Poly1305:
    cipher = keys._aead
    kind = ChaCha20Poly1305 if suite.encr is EncrId.ENCR_CHACHA20_POLY1305 else AESGCM
    if type(cipher) is not kind:  # first use (the suite fixes the kind; AESGCM: 16-octet tag)
        cipher = kind(keys.sk_e[:-AEAD_SALT_LEN])  # RFC 5282 §7.1: the salt is not key
        object.__setattr__(keys, "_aead", cipher)
    return cipher


def _icv(suite: IkeSuite, keys: SkKeys, data: bytes) -> bytes:
    assert suite.integ is not None
    alg = _INTEG[suite.integ]
    # RFC 4868 §2.1: HMAC-SHA2 truncated to its first icv_len octets.
    return hmac.digest(keys.sk_a, data, alg.hash_name)[: alg.icv_len]


def _check_keys(suite: IkeSuite, keys: SkKeys) -> None:
    # Programmer errors (keys derived for another suite), not peer input.
    if len(keys.sk_e) != suite.sk_e_len or len(keys.sk_a) != suite.sk_a_len:
        raise ValueError(
            f"keys of {len(keys.sk_e)}+{len(keys.sk_a)} bytes do not fit the suite "
            f"({suite.sk_e_len}+{suite.sk_a_len})"
        )


# -- strongSwan proposal keywords ------------------------------------------------------------


@dataclass(frozen=True)
class IkeProposal:
    """One IKE proposal as configured: one encryption algorithm (with its key length), one
    PRF, one integrity algorithm (None for an AEAD) and the key exchange methods in order
    of preference."""

    encr: EncrId
    encr_key_bits: int
    prf: PrfId
    integ: IntegId | None
    ke_groups: tuple[DhGroup, ...]

    @cached_property
    def suite(self) -> IkeSuite:
        return IkeSuite(self.encr, self.encr_key_bits, self.prf, self.integ)


_ENCR_KEYWORDS: dict[str, tuple[EncrId, int]] = {
    "aes": (EncrId.ENCR_AES_CBC, 128),
    "aes128": (EncrId.ENCR_AES_CBC, 128),
    "aes192": (EncrId.ENCR_AES_CBC, 192),
    "aes256": (EncrId.ENCR_AES_CBC, 256),
    # strongSwan: aesNNNgcm16 and its alias aesNNNgcm128 are the 16-octet-ICV variant.
    "aes128gcm16": (EncrId.ENCR_AES_GCM_16, 128),
    "aes192gcm16": (EncrId.ENCR_AES_GCM_16, 192),
    "aes256gcm16": (EncrId.ENCR_AES_GCM_16, 256),
    "aes128gcm128": (EncrId.ENCR_AES_GCM_16, 128),
    "aes192gcm128": (EncrId.ENCR_AES_GCM_16, 192),
    "aes256gcm128": (EncrId.ENCR_AES_GCM_16, 256),
    "chacha20poly1305": (EncrId.ENCR_CHACHA20_POLY1305, 256),
}
_INTEG_KEYWORDS: dict[str, IntegId] = {
    "sha256": IntegId.AUTH_HMAC_SHA2_256_128,
    "sha384": IntegId.AUTH_HMAC_SHA2_384_192,
    "sha512": IntegId.AUTH_HMAC_SHA2_512_256,
}
_PRF_KEYWORDS: dict[str, PrfId] = {
    "prfsha256": PrfId.PRF_HMAC_SHA2_256,
    "prfsha384": PrfId.PRF_HMAC_SHA2_384,
    "prfsha512": PrfId.PRF_HMAC_SHA2_512,
}
# strongSwan maps an integrity algorithm to the PRF of the same hash when none is given.
_PRF_FOR_INTEG: dict[IntegId, PrfId] = {
    IntegId.AUTH_HMAC_SHA2_256_128: PrfId.PRF_HMAC_SHA2_256,
    IntegId.AUTH_HMAC_SHA2_384_192: PrfId.PRF_HMAC_SHA2_384,
    IntegId.AUTH_HMAC_SHA2_512_256: PrfId.PRF_HMAC_SHA2_512,
}
_KE_KEYWORDS: dict[str, DhGroup] = {
    "modp2048": DhGroup.MODP_2048,
    "modp3072": DhGroup.MODP_3072,
    "modp4096": DhGroup.MODP_4096,
    "ecp256": DhGroup.ECP_256,
    "ecp384": DhGroup.ECP_384,
    "ecp521": DhGroup.ECP_521,
    "curve25519": DhGroup.CURVE25519,
    "x25519": DhGroup.CURVE25519,
    "curve448": DhGroup.CURVE448,
    "x448": DhGroup.CURVE448,
}
assert set(_KE_KEYWORDS.values()) == SUPPORTED_GROUPS


def parse_ike_proposal(keyword: str) -> IkeProposal:
    """Parse one strongSwan IKE proposal, e.g. ``aes128gcm16-prfsha256-x25519``,
    ``aes256-sha256-modp2048`` or ``chacha20poly1305-prfsha256-ecp256``.

    Tokens may come in any order (as in strongSwan). Without a PRF, the integrity
    algorithm's hash is used (strongSwan's rule); an AEAD needs an explicit PRF. Several key
    exchange methods may be listed, most preferred first. Unlike strongSwan, one proposal
    carries one encryption and one integrity algorithm: configure several proposals
    instead. Raises ``AlgorithmError`` (a ``ValueError``) naming the offending token.
    """
    text = keyword.strip().lower()
    if not text:
        raise AlgorithmError("empty IKE proposal")
    encr: tuple[EncrId, int] | None = None
    integ: IntegId | None = None
    prf_id: PrfId | None = None
    groups: list[DhGroup] = []
    for token in text.split("-"):
        if token in _ENCR_KEYWORDS:
            if encr is not None:
                raise AlgorithmError(
                    f"{keyword!r}: second encryption algorithm {token!r}; "
                    "list it in a separate proposal"
                )
            encr = _ENCR_KEYWORDS[token]
        elif INTEG_ALIASES.get(token, token) in _INTEG_KEYWORDS:
            if integ is not None:
                raise AlgorithmError(
                    f"{keyword!r}: second integrity algorithm {token!r}; "
                    "list it in a separate proposal"
                )
            integ = _INTEG_KEYWORDS[INTEG_ALIASES.get(token, token)]
        elif token in _PRF_KEYWORDS:
            if prf_id is not None:
                raise AlgorithmError(f"{keyword!r}: second PRF {token!r}")
            prf_id = _PRF_KEYWORDS[token]
        elif token in _KE_KEYWORDS:
            if _KE_KEYWORDS[token] in groups:
                raise AlgorithmError(f"{keyword!r}: key exchange method {token!r} listed twice")
            groups.append(_KE_KEYWORDS[token])
        else:
            raise AlgorithmError(
                f"{keyword!r}: unknown algorithm {token!r} (known: "
                f"{', '.join([*_ENCR_KEYWORDS, *_INTEG_KEYWORDS, *INTEG_ALIASES])}, "
                f"{', '.join([*_PRF_KEYWORDS, *_KE_KEYWORDS])})"
            )
    if encr is None:
        raise AlgorithmError(f"{keyword!r}: no encryption algorithm")
    encr_id, key_bits = encr
    aead = encr_id is not EncrId.ENCR_AES_CBC
    if aead and integ is not None:
        raise AlgorithmError(
            f"{keyword!r}: {encr_id.name} is an AEAD and takes no integrity algorithm "
            "(RFC 5282 §8); put classic and AEAD ciphers in separate proposals"
        )
    if not aead and integ is None:
        raise AlgorithmError(f"{keyword!r}: {encr_id.name} needs an integrity algorithm")
    if prf_id is None:
        if integ is None:
            raise AlgorithmError(
                f"{keyword!r}: an AEAD proposal needs an explicit PRF (e.g. prfsha256)"
            )
        prf_id = _PRF_FOR_INTEG[integ]
    if not groups:
        raise AlgorithmError(f"{keyword!r}: no key exchange method (e.g. x25519, ecp256, modp2048)")
    return IkeProposal(encr_id, key_bits, prf_id, integ, tuple(groups))
