"""Opt-in key log in Wireshark's formats, so that captures can be decrypted by an independent
tool (DESIGN §6, Observability; like aioquic's key log, off by default).

Two files in one directory, named as Wireshark names its "user accessible tables" (UAT) in a
configuration profile, so the directory can serve as one (``WIRESHARK_CONFIG_DIR``, or copy
the files into a profile):

``ikev2_decryption_table`` (ISAKMP/IKEv2 preferences, "IKEv2 Decryption Table"), one IKE SA a
line::

    <SPIi>,<SPIr>,<SK_ei>,<SK_er>,"<encryption>",<SK_ai>,<SK_ar>,"<integrity>"

SPIs and keys are bare hex (Wireshark's byte fields), algorithm names quoted; an AEAD has empty
SK_ai/SK_ar and integrity ``"NONE [RFC4306]"``; for AES-GCM SK_e includes the 4-byte salt
(RFC 5282 §7.1).

``esp_sa`` (ESP preferences, "ESP SAs"), one SA (one direction) a line, every field quoted::

    "IPv4","<src>","<dst>","0x<SPI>","<encryption>","0x<key hex>","<authentication>","0x<key hex>"

The AEAD key is key || salt (RFC 4106 §8.1, RFC 7634 §2), authentication ``"NULL"`` with an
empty key. Wireshark only decrypts ESP with the ESP preference "Attempt to detect/decode
encrypted ESP payloads" (``esp.enable_encryption_decode``) on.

Algorithm names are Wireshark's value strings (epan/dissectors/packet-isakmp.c
``vs_ikev2_encr_algs``/``vs_ikev2_auth_algs``, packet-ipsec.c ``esp_encryption_type_vals``/
``esp_authentication_type_vals``). Wireshark's IKEv2 table has no ChaCha20-Poly1305, so such an
IKE SA cannot be logged; ESP ChaCha20-Poly1305 needs a Wireshark recent enough to list it
(not 4.0). ESN is not conveyed: these are the eight ESP SA columns tshark 4.0 reads (checked);
Wireshark's 4.5 development documentation lists two more (SN length, ESN high bits), which are
not written here. An unknown algorithm, or keys of the wrong length for it, raise
``ValueError``: Wireshark stops loading a table at its first bad line, so a bad line must
never be written.

Files are created mode 0600 (an existing one is tightened to it), never through a symlink,
appended to, one ``write`` per line, unbuffered.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from types import TracebackType

from controller.ike.constants import EncrId, IntegId
from pipeline.satable import Direction, Protocol, SaRecord
from workers.algorithms import CipherKind, parse_esp

__all__ = [
    "ESP_SA_FILE",
    "IKEV2_TABLE_FILE",
    "KeyLog",
    "esp_sa_line",
    "ike_suite_keywords",
    "ikev2_line",
]

IKEV2_TABLE_FILE = "ikev2_decryption_table"
ESP_SA_FILE = "esp_sa"

IKE_SPI_LEN = 8  # RFC 7296 §3.1


@dataclass(frozen=True)
class _Alg:
    name: str  # Wireshark's value string
    key_len: int  # bytes, salt included


# IKEv2 encryption by strongSwan keyword (controller/ike/crypto.py ``_ENCR_KEYWORDS``).
_IKE_ENCR: dict[str, _Alg] = {
    "aes": _Alg("AES-CBC-128 [RFC3602]", 16),
    "aes128": _Alg("AES-CBC-128 [RFC3602]", 16),
    "aes192": _Alg("AES-CBC-192 [RFC3602]", 24),
    "aes256": _Alg("AES-CBC-256 [RFC3602]", 32),
    # RFC 5282 §7.1: SK_e is the key followed by a 4-byte salt.
    "aes128gcm16": _Alg("AES-GCM-128 with 16 octet ICV [RFC5282]", 20),
    "aes192gcm16": _Alg("AES-GCM-192 with 16 octet ICV [RFC5282]", 28),
    "aes256gcm16": _Alg("AES-GCM-256 with 16 octet ICV [RFC5282]", 36),
}
_IKE_ENCR_ALIASES = {"aes128gcm128": "aes128gcm16", "aes192gcm128": "aes192gcm16",
                     "aes256gcm128": "aes256gcm16"}
_IKE_AEAD = frozenset({"aes128gcm16", "aes192gcm16", "aes256gcm16"})
# RFC 4868 §2.1.1: the HMAC-SHA2 key is as long as the hash output.
_IKE_INTEG: dict[str, _Alg] = {
    "sha256": _Alg("HMAC_SHA2_256_128 [RFC4868]", 32),
    "sha384": _Alg("HMAC_SHA2_384_192 [RFC4868]", 48),
    "sha512": _Alg("HMAC_SHA2_512_256 [RFC4868]", 64),
}
_INTEG_ALIASES = {"sha2_256": "sha256", "sha2_384": "sha384", "sha2_512": "sha512"}
_IKE_INTEG_NONE = "NONE [RFC4306]"

_ESP_ENCR: dict[CipherKind, str] = {
    CipherKind.AEAD_AES_GCM: "AES-GCM with 16 octet ICV [RFC4106]",
    CipherKind.AEAD_CHACHA20_POLY1305: "ChaCha20 with Poly1305 [RFC7634]",
    CipherKind.AES_CBC: "AES-CBC [RFC3602]",
    CipherKind.NULL: "NULL",
}
_ESP_AUTH: dict[str, str] = {
    "sha256": "HMAC-SHA-256-128 [RFC4868]",
    "sha384": "HMAC-SHA-384-192 [RFC4868]",
    "sha512": "HMAC-SHA-512-256 [RFC4868]",
}
_ESP_AUTH_NONE = "NULL"


def _spi_bytes(spi: bytes | int, what: str) -> bytes:
    if isinstance(spi, int):
        if not 0 <= spi < 1 << 64:
            raise ValueError(f"{what}: {spi:#x} does not fit 8 bytes")
        return spi.to_bytes(IKE_SPI_LEN, "big")
    if len(spi) != IKE_SPI_LEN:
        raise ValueError(f"{what}: {len(spi)} bytes, an IKE SPI has {IKE_SPI_LEN}")
    return bytes(spi)


def _check_len(what: str, key: bytes, want: int, alg: str) -> None:
    if len(key) != want:
        raise ValueError(f"{what}: {len(key)} bytes given, {alg} needs {want}")


def ikev2_line(spi_i: bytes | int, spi_r: bytes | int, sk_ei: bytes, sk_er: bytes, encr: str,
               sk_ai: bytes = b"", sk_ar: bytes = b"", integ: str | None = None) -> str:
    """One ``ikev2_decryption_table`` record (with its newline).

    ``encr`` is a strongSwan IKE encryption keyword (``aes128``, ``aes256gcm16``, ...),
    ``integ`` an integrity keyword (``sha256``, ...) or None for an AEAD.
    """
    keyword = encr.strip().lower()
    keyword = _IKE_ENCR_ALIASES.get(keyword, keyword)
    if keyword == "chacha20poly1305":
        raise ValueError("chacha20poly1305: Wireshark's IKEv2 decryption table has no "
                         "ChaCha20-Poly1305 entry")
    e = _IKE_ENCR.get(keyword)
    if e is None:
        raise ValueError(f"IKE encryption {encr!r} has no Wireshark name "
                         f"(known: {', '.join(_IKE_ENCR)})")
    _check_len("SK_ei", sk_ei, e.key_len, keyword)
    _check_len("SK_er", sk_er, e.key_len, keyword)
    if keyword in _IKE_AEAD:
        if integ is not None:
            raise ValueError(f"{keyword} is an AEAD: no integrity algorithm (RFC 5282 §8)")
        if sk_ai or sk_ar:
            raise ValueError(f"{keyword} is an AEAD: SK_ai and SK_ar are empty")
        integ_name = _IKE_INTEG_NONE
    else:
        if integ is None:
            raise ValueError(f"{keyword} needs an integrity algorithm")
        ikw = _INTEG_ALIASES.get(integ.strip().lower(), integ.strip().lower())
        a = _IKE_INTEG.get(ikw)
        if a is None:
            raise ValueError(f"IKE integrity {integ!r} has no Wireshark name "
                             f"(known: {', '.join(_IKE_INTEG)})")
        _check_len("SK_ai", sk_ai, a.key_len, ikw)
        _check_len("SK_ar", sk_ar, a.key_len, ikw)
        integ_name = a.name
    fields = (_spi_bytes(spi_i, "SPIi").hex(), _spi_bytes(spi_r, "SPIr").hex(), sk_ei.hex(),
              sk_er.hex(), f'"{e.name}"', sk_ai.hex(), sk_ar.hex(), f'"{integ_name}"')
    return ",".join(fields) + "\n"


def esp_sa_line(src: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
                dst: str | ipaddress.IPv4Address | ipaddress.IPv6Address, spi: int, encr: str,
                enc_key: bytes, integ: str | None = None, integ_key: bytes = b"", *,
                chacha20: bool = True) -> str:
    """One ``esp_sa`` record (with its newline) for the SA carrying packets ``src`` -> ``dst``
    (the outer addresses).

    ``encr`` is an espline ESP keyword, either whole (``aes128gcm16``, ``aes256-sha512``,
    ``null-sha256``) with ``integ`` None, or the cipher alone (``aes128``) with ``integ``
    (``sha256``). ``enc_key`` is the encryption key material, salt included for the AEADs.
    ``chacha20=False`` refuses ChaCha20-Poly1305, for a Wireshark without it.
    """
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"esp_sa: {s} and {d} are of different address families")
    if not 0 <= spi <= 0xFFFFFFFF:
        raise ValueError(f"esp_sa: SPI {spi:#x} does not fit 32 bits")
    keyword = encr if integ is None else f"{encr}-{integ}"
    t = parse_esp(keyword)  # AlgorithmError is a ValueError
    if t.kind is CipherKind.AEAD_CHACHA20_POLY1305 and not chacha20:
        raise ValueError(f"{t.keyword}: this key log is set for a Wireshark without ESP "
                         "ChaCha20-Poly1305")
    _check_len("encryption key", enc_key, t.key_material_len, t.keyword)
    if t.integ is None:
        if integ_key:
            raise ValueError(f"{t.keyword} is an AEAD: no integrity key")
        auth, auth_key = _ESP_AUTH_NONE, ""
    else:
        _check_len("integrity key", integ_key, t.integ.key_len, t.keyword)
        auth, auth_key = _ESP_AUTH[t.integ.keyword], "0x" + integ_key.hex()
    # NULL encryption has no key: Wireshark reads "0x" as an empty one.
    fields = ("IPv4" if s.version == 4 else "IPv6", str(s), str(d), f"0x{spi:08x}",
              _ESP_ENCR[t.kind], "0x" + enc_key.hex(), auth, auth_key)
    return ",".join(f'"{f}"' for f in fields) + "\n"


def ike_suite_keywords(encr: int, key_bits: int, integ: int | None) -> tuple[str, str | None]:
    """strongSwan keywords for an IKE SA's negotiated transforms (``IkeSuite.encr``,
    ``encr_key_bits``, ``integ``), as ``KeyLog.log_ike_sa`` takes them."""
    if encr == EncrId.ENCR_AES_CBC:
        enc = f"aes{key_bits}"
    elif encr == EncrId.ENCR_AES_GCM_16:
        enc = f"aes{key_bits}gcm16"
    elif encr == EncrId.ENCR_CHACHA20_POLY1305:
        enc = "chacha20poly1305"
    else:
        raise ValueError(f"encryption transform {encr} has no keyword here")
    integ_kw = {IntegId.AUTH_HMAC_SHA2_256_128: "sha256", IntegId.AUTH_HMAC_SHA2_384_192: "sha384",
                IntegId.AUTH_HMAC_SHA2_512_256: "sha512"}
    if integ is None or integ == IntegId.NONE:
        return enc, None
    if integ not in integ_kw:
        raise ValueError(f"integrity transform {integ} has no keyword here")
    return enc, integ_kw[IntegId(integ)]


_HEADERS = {
    IKEV2_TABLE_FILE: "# espline key log: Wireshark IKEv2 decryption table (SPIi, SPIr, SK_ei, "
                      "SK_er, encryption, SK_ai, SK_ar, integrity)\n",
    ESP_SA_FILE: "# espline key log: Wireshark ESP SAs (protocol, source, destination, SPI, "
                 "encryption, key, authentication, key)\n",
}


class KeyLog:
    """Appends IKE and ESP SAs' keys to ``<directory>/ikev2_decryption_table`` and
    ``<directory>/esp_sa``. Key material on disk: enable it only to debug."""

    def __init__(self, directory: str | os.PathLike[str], *, esp_chacha20: bool = True) -> None:
        """``esp_chacha20=False`` makes ESP ChaCha20-Poly1305 SAs raise ``ValueError``
        instead of being logged: a Wireshark that lacks them (4.0, as in Debian 12) stops
        loading ``esp_sa`` at the first such line."""
        self.directory = os.fspath(directory)
        self.esp_chacha20 = esp_chacha20
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        try:
            for name in (IKEV2_TABLE_FILE, ESP_SA_FILE):
                self._fds[name] = self._open(name)
        except BaseException:
            self.close()
            raise

    def _open(self, name: str) -> int:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
            if os.fstat(fd).st_size == 0:
                os.write(fd, _HEADERS[name].encode("ascii"))
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def ikev2_path(self) -> str:
        return os.path.join(self.directory, IKEV2_TABLE_FILE)

    @property
    def esp_path(self) -> str:
        return os.path.join(self.directory, ESP_SA_FILE)

    def _append(self, name: str, line: str) -> None:
        data = line.encode("ascii")
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                raise ValueError("the key log is closed")
            # One write of one line with O_APPEND: lines never interleave.
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {name}: {written} of {len(data)} bytes")

    def log_ike_sa(self, spi_i: bytes | int, spi_r: bytes | int, sk_ei: bytes, sk_er: bytes,
                   encr: str, sk_ai: bytes = b"", sk_ar: bytes = b"",
                   integ: str | None = None) -> None:
        """Log an IKE SA's SK payload keys (RFC 7296 §2.14); see ``ikev2_line``."""
        self._append(IKEV2_TABLE_FILE,
                     ikev2_line(spi_i, spi_r, sk_ei, sk_er, encr, sk_ai, sk_ar, integ))

    def log_esp_sa(self, src: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
                   dst: str | ipaddress.IPv4Address | ipaddress.IPv6Address, spi: int,
                   encr: str, enc_key: bytes, integ: str | None = None,
                   integ_key: bytes = b"") -> None:
        """Log one ESP SA (one direction); see ``esp_sa_line``."""
        self._append(ESP_SA_FILE, esp_sa_line(src, dst, spi, encr, enc_key, integ, integ_key,
                                              chacha20=self.esp_chacha20))

    def log_sa_record(self, record: SaRecord) -> bool:
        """Log a data plane SA record (outbound: local -> remote, inbound: remote -> local).
        AH SAs carry no ciphertext and are not logged: returns False for them."""
        if record.protocol is not Protocol.ESP:
            return False
        if record.direction is Direction.OUT:
            src, dst = record.local_addr, record.remote_addr
        else:
            src, dst = record.remote_addr, record.local_addr
        self.log_esp_sa(src, dst, record.spi, record.alg, record.enc_key,
                        integ_key=record.integ_key)
        return True

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> KeyLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
