"""ESP and AH algorithms by strongSwan keyword, and the transform parameters the codecs need.

Keywords follow strongSwan's proposal syntax (``aes128gcm16``, ``chacha20poly1305``,
``aes256-sha384``, ``null-sha256``; for AH ``sha256``), with an optional ``-esn`` / ``-noesn``.
Key material, as negotiated by IKE (RFC 7296 §2.17) or given for a static SA, is the
concatenation ``encryption key || salt`` for the AEADs and ``encryption key`` and
``integrity key`` separately otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "AlgorithmError",
    "CipherKind",
    "EspTransform",
    "IntegAlg",
    "parse_ah",
    "parse_esp",
]


class AlgorithmError(ValueError):
    """An unknown or malformed algorithm keyword, or key material of the wrong size."""


class CipherKind(Enum):
    AEAD_AES_GCM = "aes-gcm"  # RFC 4106
    AEAD_CHACHA20_POLY1305 = "chacha20-poly1305"  # RFC 7634
    AES_CBC = "aes-cbc"  # RFC 3602
    NULL = "null"  # RFC 2410


@dataclass(frozen=True)
class IntegAlg:
    """HMAC-SHA2 with truncation (RFC 4868 §2.1)."""

    keyword: str
    hash_name: str  # hashlib name
    key_len: int  # RFC 4868 §2.1.1: key length = hash output length
    icv_len: int  # truncated output


INTEG_ALGS: dict[str, IntegAlg] = {
    # strongSwan: sha256 / sha2_256 = HMAC-SHA2-256-128, etc.
    "sha256": IntegAlg("sha256", "sha256", 32, 16),
    "sha384": IntegAlg("sha384", "sha384", 48, 24),
    "sha512": IntegAlg("sha512", "sha512", 64, 32),
}
INTEG_ALIASES = {"sha2_256": "sha256", "sha2_384": "sha384", "sha2_512": "sha512"}


@dataclass(frozen=True)
class EspTransform:
    """Everything the ESP codec needs to know about an algorithm suite."""

    keyword: str  # canonical strongSwan keyword, e.g. "aes128gcm16", "aes256-sha384"
    kind: CipherKind
    enc_key_len: int  # bytes, salt excluded
    salt_len: int  # RFC 4106 §8.1 / RFC 7634 §4: 4 bytes from the key material
    iv_len: int  # bytes carried in each packet
    block_len: int  # padding boundary of the plaintext (at least 4, RFC 4303 §2.4)
    icv_len: int
    integ: IntegAlg | None  # None for the AEADs
    esn: bool | None  # from an -esn/-noesn suffix; None = not stated

    @property
    def is_aead(self) -> bool:
        return self.integ is None

    @property
    def key_material_len(self) -> int:
        """Length of the encryption key material (key + salt), as IKE derives it."""
        return self.enc_key_len + self.salt_len


_AEADS = {
    # RFC 4106: 16-byte ICV variant, 8-byte explicit IV, 4-byte salt.
    "aes128gcm16": (CipherKind.AEAD_AES_GCM, 16),
    "aes192gcm16": (CipherKind.AEAD_AES_GCM, 24),
    "aes256gcm16": (CipherKind.AEAD_AES_GCM, 32),
    # RFC 7634 §2: 8-byte IV, 4-byte salt, 16-byte tag.
    "chacha20poly1305": (CipherKind.AEAD_CHACHA20_POLY1305, 32),
}
_AEAD_ALIASES = {"aes128gcm128": "aes128gcm16", "aes256gcm128": "aes256gcm16"}
_CBC = {"aes128": 16, "aes192": 24, "aes256": 32, "aes": 16}


def _split_esn(keyword: str) -> tuple[list[str], bool | None]:
    parts = keyword.strip().lower().split("-")
    esn: bool | None = None
    while parts and parts[-1] in ("esn", "noesn"):
        esn = parts.pop() == "esn"
    return parts, esn


@functools.lru_cache(maxsize=256)  # every SA install parses its keyword; there are few
def parse_esp(keyword: str) -> EspTransform:
    """Parse one strongSwan ESP proposal keyword into its transform parameters."""
    parts, esn = _split_esn(keyword)
    if not parts or not parts[0]:
        raise AlgorithmError(f"empty ESP algorithm {keyword!r}")
    enc = _AEAD_ALIASES.get(parts[0], parts[0])
    if enc in _AEADS:
        if len(parts) != 1:
            raise AlgorithmError(f"{keyword!r}: an AEAD takes no integrity algorithm")
        kind, key_len = _AEADS[enc]
        return EspTransform(enc, kind, key_len, 4, 8, 4, 16, None, esn)
    if len(parts) != 2:
        raise AlgorithmError(
            f"{keyword!r}: expected '<cipher>-<integrity>' (e.g. aes128-sha256) or an AEAD"
        )
    integ_name = INTEG_ALIASES.get(parts[1], parts[1])
    integ = INTEG_ALGS.get(integ_name)
    if integ is None:
        raise AlgorithmError(
            f"{keyword!r}: unknown integrity algorithm {parts[1]!r} "
            f"(known: {', '.join(INTEG_ALGS)})"
        )
    if enc == "null":
        # RFC 2410: no IV, no block; ESP still aligns the trailer to 4 bytes (RFC 4303 §2.4).
        return EspTransform(f"null-{integ.keyword}", CipherKind.NULL, 0, 0, 0, 4,
                            integ.icv_len, integ, esn)
    if enc in _CBC:
        key_len = _CBC[enc]
        name = f"aes{key_len * 8}-{integ.keyword}"
        # RFC 3602 §3: 16-byte IV, plaintext padded to the 16-byte AES block.
        return EspTransform(name, CipherKind.AES_CBC, key_len, 0, 16, 16, integ.icv_len,
                            integ, esn)
    raise AlgorithmError(
        f"{keyword!r}: unknown encryption algorithm {parts[0]!r} "
        f"(known: {', '.join([*_AEADS, *_CBC, 'null'])})"
    )


def parse_ah(keyword: str) -> tuple[IntegAlg, bool | None]:
    """Parse an AH proposal keyword (``sha256``, ``sha384-esn``, ...)."""
    parts, esn = _split_esn(keyword)
    name = INTEG_ALIASES.get("-".join(parts), "-".join(parts))
    integ = INTEG_ALGS.get(name)
    if integ is None:
        raise AlgorithmError(
            f"{keyword!r}: unknown AH integrity algorithm (known: {', '.join(INTEG_ALGS)})"
        )
    return integ, esn
