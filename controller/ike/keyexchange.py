"""IKEv2 key exchange methods (Diffie-Hellman groups): key generation, KE payload data, g^ir.

Sans-IO: ``generate`` takes the randomness as a ``random(n) -> n bytes`` callable. Only when
none is given does it fall back to the ``cryptography`` package's own generators, which draw
from OpenSSL's CSPRNG (``cryptography`` offers no way to inject randomness into them).

Key Exchange Data, as carried in the KE payload (RFC 7296 §3.4) and as returned by
``public_bytes``:

* MODP groups 14, 15, 16 (RFC 3526): g^x as a big-endian integer, zero-padded on the left
  to the length of the prime (RFC 7296 §3.4).
* ECP groups 19, 20, 21 (RFC 5903 §7): x || y, each coordinate zero-padded to the field
  length; no 0x04 point-format octet.
* Curve25519 / Curve448 (RFC 8031 §3): the raw 32 / 56 byte u-coordinate of RFC 7748 §5.

``shared_secret`` returns g^ir in the form RFC 7296 §2.14 feeds to the PRF: MODP padded to
the prime length, ECP the x coordinate only (RFC 5903 §7), X25519/X448 the raw RFC 7748
output, never all zeros (RFC 8031, RFC 7748 §6). Every check of the peer's value raises
``InvalidKeyExchange``.

The secret operations run inside OpenSSL (constant time). For MODP, ``cryptography`` 50
still supports finite-field DH but flags it deprecated; its ``CryptographyDeprecationWarning``
is silenced around our calls only. When it is removed this module needs a fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

from cryptography.hazmat.primitives.asymmetric import ec, x448, x25519
from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    # cryptography 50 deprecates finite-field DH (even attribute access warns); IKEv2 still
    # negotiates MODP groups 14-16.
    warnings.simplefilter("ignore", CryptographyDeprecationWarning)
    from cryptography.hazmat.primitives.asymmetric.dh import (
        DHParameterNumbers,
        DHPrivateKey,
        DHPrivateNumbers,
        DHPublicNumbers,
    )

from .constants import DhGroup

__all__ = [
    "MODP_PRIMES",
    "SUPPORTED_GROUPS",
    "InvalidKeyExchange",
    "KePrivate",
    "RandomFn",
    "generate",
    "key_exchange_data_len",
    "public_bytes",
    "shared_secret",
]

RandomFn = Callable[[int], bytes]
"""``random(n)`` returns ``n`` bytes from a CSPRNG (``os.urandom`` in production)."""


class InvalidKeyExchange(ValueError):
    """The peer's Key Exchange Data is malformed or not a valid group element, or the
    exchange produced a degenerate shared secret. The caller answers INVALID_SYNTAX (or,
    in IKE_SA_INIT, drops the exchange); the value must never reach SKEYSEED."""


# ---------------------------------------------------------------------------------------
# RFC 3526 MODP primes (generator 2), copied from RFC 3526 §3 (2048-bit, group 14),
# §4 (3072-bit, group 15) and §5 (4096-bit, group 16). Each is
# p = 2^N - 2^(N-64) - 1 + 2^64 * ( [2^(N-130) pi] + k ): both 64-bit ends are all ones.
# tests/test_ike_crypto.py checks that each is a safe prime.
# ---------------------------------------------------------------------------------------

_MODP_2048_P = """
FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE45B3D
C2007CB8 A163BF05 98DA4836 1C55D39A 69163FA8 FD24CF5F
83655D23 DCA3AD96 1C62F356 208552BB 9ED52907 7096966D
670C354E 4ABC9804 F1746C08 CA18217C 32905E46 2E36CE3B
E39E772C 180E8603 9B2783A2 EC07A28F B5C55DF0 6F4C52C9
DE2BCBF6 95581718 3995497C EA956AE5 15D22618 98FA0510
15728E5A 8AACAA68 FFFFFFFF FFFFFFFF
"""

_MODP_3072_P = """
FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE45B3D
C2007CB8 A163BF05 98DA4836 1C55D39A 69163FA8 FD24CF5F
83655D23 DCA3AD96 1C62F356 208552BB 9ED52907 7096966D
670C354E 4ABC9804 F1746C08 CA18217C 32905E46 2E36CE3B
E39E772C 180E8603 9B2783A2 EC07A28F B5C55DF0 6F4C52C9
DE2BCBF6 95581718 3995497C EA956AE5 15D22618 98FA0510
15728E5A 8AAAC42D AD33170D 04507A33 A85521AB DF1CBA64
ECFB8504 58DBEF0A 8AEA7157 5D060C7D B3970F85 A6E1E4C7
ABF5AE8C DB0933D7 1E8C94E0 4A25619D CEE3D226 1AD2EE6B
F12FFA06 D98A0864 D8760273 3EC86A64 521F2B18 177B200C
BBE11757 7A615D6C 770988C0 BAD946E2 08E24FA0 74E5AB31
43DB5BFC E0FD108E 4B82D120 A93AD2CA FFFFFFFF FFFFFFFF
"""

_MODP_4096_P = """
FFFFFFFF FFFFFFFF C90FDAA2 2168C234 C4C6628B 80DC1CD1
29024E08 8A67CC74 020BBEA6 3B139B22 514A0879 8E3404DD
EF9519B3 CD3A431B 302B0A6D F25F1437 4FE1356D 6D51C245
E485B576 625E7EC6 F44C42E9 A637ED6B 0BFF5CB6 F406B7ED
EE386BFB 5A899FA5 AE9F2411 7C4B1FE6 49286651 ECE45B3D
C2007CB8 A163BF05 98DA4836 1C55D39A 69163FA8 FD24CF5F
83655D23 DCA3AD96 1C62F356 208552BB 9ED52907 7096966D
670C354E 4ABC9804 F1746C08 CA18217C 32905E46 2E36CE3B
E39E772C 180E8603 9B2783A2 EC07A28F B5C55DF0 6F4C52C9
DE2BCBF6 95581718 3995497C EA956AE5 15D22618 98FA0510
15728E5A 8AAAC42D AD33170D 04507A33 A85521AB DF1CBA64
ECFB8504 58DBEF0A 8AEA7157 5D060C7D B3970F85 A6E1E4C7
ABF5AE8C DB0933D7 1E8C94E0 4A25619D CEE3D226 1AD2EE6B
F12FFA06 D98A0864 D8760273 3EC86A64 521F2B18 177B200C
BBE11757 7A615D6C 770988C0 BAD946E2 08E24FA0 74E5AB31
43DB5BFC E0FD108E 4B82D120 A9210801 1A723C12 A787E6D7
88719A10 BDBA5B26 99C32718 6AF4E23C 1A946834 B6150BDA
2583E9CA 2AD44CE8 DBBBC2DB 04DE8EF9 2E8EFC14 1FBECAA6
287C5947 4E6BC05D 99B2964F A090C3A2 233BA186 515BE7ED
1F612970 CEE2D7AF B81BDD76 2170481C D0069127 D5B05AA9
93B4EA98 8D8FDDC1 86FFB7DC 90A6C08F 4DF435C9 34063199
FFFFFFFF FFFFFFFF
"""

MODP_GENERATOR = 2  # RFC 3526 §§3-5: "The generator is: 2."

MODP_PRIMES: dict[DhGroup, int] = {
    DhGroup.MODP_2048: int("".join(_MODP_2048_P.split()), 16),
    DhGroup.MODP_3072: int("".join(_MODP_3072_P.split()), 16),
    DhGroup.MODP_4096: int("".join(_MODP_4096_P.split()), 16),
}

_EC_CURVES: dict[DhGroup, tuple[ec.EllipticCurve, int, int]] = {
    # group: (curve, field element length in bytes, group order n)
    DhGroup.ECP_256: (
        ec.SECP256R1(),
        32,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    ),
    DhGroup.ECP_384: (
        ec.SECP384R1(),
        48,
        int(
            "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973",
            16,
        ),
    ),
    DhGroup.ECP_521: (
        ec.SECP521R1(),
        66,  # ceil(521 / 8)
        int(
            "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
            "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
            16,
        ),
    ),
}
# Group orders n as in RFC 5903 §3 (= FIPS 186-4 D.1.2, SEC 2 secp256r1/secp384r1/secp521r1);
# tests/test_ike_crypto.py checks each against OpenSSL (n-1 is a valid scalar, n is not).

_MONTGOMERY_LEN = {DhGroup.CURVE25519: 32, DhGroup.CURVE448: 56}  # RFC 7748 §5, RFC 8031 §3

SUPPORTED_GROUPS: frozenset[DhGroup] = frozenset([*MODP_PRIMES, *_EC_CURVES, *_MONTGOMERY_LEN])
_SUPPORTED_BY_VALUE: dict[int, DhGroup] = {int(group): group for group in SUPPORTED_GROUPS}

_Key = DHPrivateKey | ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey | x448.X448PrivateKey


@dataclass(frozen=True, eq=False)
class KePrivate:
    """Our half of one key exchange: the group, the secret, and the Key Exchange Data we
    send. The repr never shows the secret."""

    group: DhGroup
    public: bytes  # Key Exchange Data for our KE payload (RFC 7296 §3.4)
    _key: _Key = field(repr=False)

    def __repr__(self) -> str:
        return f"KePrivate(group={self.group.name}, public=<{len(self.public)} bytes>)"


def key_exchange_data_len(group: DhGroup) -> int:
    """Length of a valid Key Exchange Data field for ``group`` (RFC 7296 §3.4)."""
    group = _supported(group)
    if group in MODP_PRIMES:
        return _byte_len(MODP_PRIMES[group])
    if group in _EC_CURVES:
        return 2 * _EC_CURVES[group][1]  # RFC 5903 §7: x || y
    return _MONTGOMERY_LEN[group]


def generate(group: DhGroup, random: RandomFn | None = None) -> KePrivate:
    """A fresh private value for ``group`` and its Key Exchange Data.

    With ``random``, the secret is drawn from it (rejection sampling, so uniform);
    without, ``cryptography``'s generator (OpenSSL's CSPRNG) is used. Raises
    ``ValueError`` for a group outside ``SUPPORTED_GROUPS``.
    """
    group = _supported(group)
    if group in MODP_PRIMES:
        return _modp_generate(group, random)
    if group in _EC_CURVES:
        return _ecp_generate(group, random)
    return _montgomery_generate(group, random)


def public_bytes(private: KePrivate) -> bytes:
    """Key Exchange Data for our KE payload (RFC 7296 §3.4)."""
    return private.public


def shared_secret(private: KePrivate, peer_public: bytes) -> bytes:
    """g^ir from our private value and the peer's Key Exchange Data, validated first.

    Raises ``InvalidKeyExchange`` for a value of the wrong length, outside the group, or
    giving a degenerate secret.
    """
    group = private.group
    expected = key_exchange_data_len(group)
    if len(peer_public) != expected:
        # RFC 7296 §3.4 / RFC 5903 §7 / RFC 8031 §3: the length is fixed by the group.
        raise InvalidKeyExchange(
            f"{group.name}: Key Exchange Data is {len(peer_public)} bytes, expected {expected}"
        )
    key = private._key
    if isinstance(key, x25519.X25519PrivateKey | x448.X448PrivateKey):
        return _montgomery_shared(group, key, peer_public)
    if isinstance(key, DHPrivateKey):
        return _modp_shared(group, key, peer_public)
    return _ecp_shared(group, key, peer_public)


# -- MODP --------------------------------------------------------------------------------


@contextmanager
def _ffdh() -> Iterator[None]:
    """Silence cryptography's FFDH deprecation warning for the calls inside only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


@cache
def _modp_parameters(group: DhGroup) -> DHParameterNumbers:
    return DHParameterNumbers(MODP_PRIMES[group], MODP_GENERATOR)


def _modp_generate(group: DhGroup, random: RandomFn | None) -> KePrivate:
    p = MODP_PRIMES[group]
    length = _byte_len(p)
    with _ffdh():
        numbers = _modp_parameters(group)
        if random is None:
            key = numbers.parameters().generate_private_key()
        else:
            # Uniform in [1, q-1] with q = (p-1)/2, the prime order of the subgroup that
            # 2 generates (RFC 3526 primes are safe primes), the range NIST SP 800-56A
            # allows for safe-prime groups.
            x = _uniform(random, 1, (p - 1) // 2 - 1)
            # g^x is computed by OpenSSL's constant-time ladder: "agreeing" with the public
            # value g itself yields g^x. The placeholder public value is replaced below.
            placeholder = DHPrivateNumbers(x, DHPublicNumbers(MODP_GENERATOR, numbers))
            generator = DHPublicNumbers(MODP_GENERATOR, numbers).public_key()
            y = int.from_bytes(placeholder.private_key().exchange(generator), "big")
            key = DHPrivateNumbers(x, DHPublicNumbers(y, numbers)).private_key()
        y = key.public_key().public_numbers().y
    return KePrivate(group, y.to_bytes(length, "big"), key)


def _modp_shared(group: DhGroup, key: DHPrivateKey, peer_public: bytes) -> bytes:
    p = MODP_PRIMES[group]
    y = int.from_bytes(peer_public, "big")
    # RFC 6989 §2: for safe-prime MODP groups, checking 1 < y < p-1 excludes the only
    # small-subgroup elements (1 and p-1) besides rejecting out-of-range values.
    if not 1 < y < p - 1:
        raise InvalidKeyExchange(f"{group.name}: public value outside 1 < y < p-1")
    with _ffdh():
        peer = DHPublicNumbers(y, _modp_parameters(group)).public_key()
        try:
            secret = key.exchange(peer)
        except ValueError as exc:
            raise InvalidKeyExchange(f"{group.name}: {exc}") from None
    # RFC 7296 §2.14 (with §3.4): g^ir is padded with zeros to the length of the prime.
    return secret.rjust(_byte_len(p), b"\x00")


# -- ECP ---------------------------------------------------------------------------------


def _ecp_generate(group: DhGroup, random: RandomFn | None) -> KePrivate:
    curve, coord_len, order = _EC_CURVES[group]
    if random is None:
        key = ec.generate_private_key(curve)
    else:
        key = ec.derive_private_key(_uniform(random, 1, order - 1), curve)
    numbers = key.public_key().public_numbers()
    # RFC 5903 §7: x || y, each at the field length; no point-format octet.
    public = numbers.x.to_bytes(coord_len, "big") + numbers.y.to_bytes(coord_len, "big")
    return KePrivate(group, public, key)


def _ecp_shared(group: DhGroup, key: ec.EllipticCurvePrivateKey, peer_public: bytes) -> bytes:
    curve, coord_len, _ = _EC_CURVES[group]
    try:
        # RFC 6989 §2: the point must be on the curve (cryptography checks it, and rejects
        # the point at infinity, which has no x || y encoding anyway).
        peer = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + peer_public)
        secret = key.exchange(ec.ECDH(), peer)
    except ValueError as exc:
        raise InvalidKeyExchange(f"{group.name}: {exc}") from None
    # RFC 5903 §7: the shared secret is the x coordinate of g^ir, at the field length.
    return secret.rjust(coord_len, b"\x00")


# -- Curve25519 / Curve448 ---------------------------------------------------------------


def _montgomery_generate(group: DhGroup, random: RandomFn | None) -> KePrivate:
    key: x25519.X25519PrivateKey | x448.X448PrivateKey
    length = _MONTGOMERY_LEN[group]
    if group is DhGroup.CURVE25519:
        if random is None:
            key = x25519.X25519PrivateKey.generate()
        else:
            key = x25519.X25519PrivateKey.from_private_bytes(_exact(random, length))
    else:
        if random is None:
            key = x448.X448PrivateKey.generate()
        else:
            key = x448.X448PrivateKey.from_private_bytes(_exact(random, length))
    # RFC 8031 §3: the Key Exchange Data is the RFC 7748 u-coordinate, raw (little-endian).
    return KePrivate(group, key.public_key().public_bytes_raw(), key)


def _montgomery_shared(
    group: DhGroup, key: x25519.X25519PrivateKey | x448.X448PrivateKey, peer_public: bytes
) -> bytes:
    try:
        if isinstance(key, x25519.X25519PrivateKey):
            secret = key.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        else:
            secret = key.exchange(x448.X448PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        # OpenSSL refuses low-order points (all-zero output) with a ValueError.
        raise InvalidKeyExchange(f"{group.name}: {exc}") from None
    # RFC 8031 / RFC 7748 §6.1, §6.2: an all-zero shared secret means a low-order point.
    if not any(secret):
        raise InvalidKeyExchange(f"{group.name}: all-zero shared secret")
    return secret


# -- helpers -----------------------------------------------------------------------------


def _supported(group: int) -> DhGroup:
    supported = _SUPPORTED_BY_VALUE.get(group)
    if supported is None:
        raise ValueError(f"unsupported key exchange method {group!r}")
    return supported


def _byte_len(n: int) -> int:
    return (n.bit_length() + 7) // 8


def _exact(random: RandomFn, n: int) -> bytes:
    data = random(n)
    if len(data) != n:
        raise ValueError(f"random({n}) returned {len(data)} bytes")
    return data


def _uniform(random: RandomFn, low: int, high: int) -> int:
    """An integer uniform in [low, high], by rejection sampling on random bytes.

    Candidates are the random bytes read big-endian and masked to ``high``'s bit length,
    so a source that returns a valid scalar yields exactly that scalar (test vectors)."""
    bits = high.bit_length()
    mask = (1 << bits) - 1
    nbytes = (bits + 7) // 8
    # Each draw succeeds with probability above 1/2 for every group here (the bounds are
    # within a factor 2 of a power of two), so 128 failures in a row mean a broken source.
    for _ in range(128):
        candidate = int.from_bytes(_exact(random, nbytes), "big") & mask
        if low <= candidate <= high:
            return candidate
    raise ValueError("random source keeps returning out-of-range values")
