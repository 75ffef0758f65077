"""controller/keylog.py: Wireshark's ikev2_decryption_table and esp_sa lines, exactly; files
0600; values read back; and, where tshark is installed, tshark decrypting ESP packets built by
workers/esp.py and an IKE exchange run by controller/ike with nothing but the key log."""

from __future__ import annotations

import csv
import ipaddress
import os
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from controller.ike.constants import EncrId, IntegId
from controller.ike.crypto import parse_ike_proposal
from controller.ike.ike_sa import IkeSa
from controller.keylog import (
    ESP_SA_FILE,
    IKEV2_TABLE_FILE,
    KeyLog,
    esp_sa_line,
    ike_suite_keywords,
    ikev2_line,
)
from pipeline.satable import Direction, Mode, Protocol, SaRecord
from tests import esp_support as es

SPI_I = bytes.fromhex("0123456789abcdef")
SPI_R = bytes.fromhex("fedcba9876543210")


def data_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines(keepends=True)
            if not line.startswith("#")]


def fields(line: str) -> list[str]:
    """A UAT record split as Wireshark's loader does (comma separated, "quoted" strings)."""
    [row] = csv.reader([line.rstrip("\n")])
    return row


# -- exact formats ----------------------------------------------------------------------------

def test_ikev2_line_aead() -> None:
    line = ikev2_line(SPI_I, SPI_R, bytes(range(20)), bytes(range(20, 40)), "aes128gcm16")
    assert line == (
        "0123456789abcdef,fedcba9876543210,"
        "000102030405060708090a0b0c0d0e0f10111213,"
        "1415161718191a1b1c1d1e1f2021222324252627,"
        '"AES-GCM-128 with 16 octet ICV [RFC5282]",,,"NONE [RFC4306]"\n'
    )


def test_ikev2_line_cbc_with_integrity() -> None:
    line = ikev2_line(0x0123456789ABCDEF, 0xFEDCBA9876543210, b"\xaa" * 32, b"\xbb" * 32,
                      "aes256", b"\xcc" * 48, b"\xdd" * 48, "sha384")
    assert line == (
        f"0123456789abcdef,fedcba9876543210,{'aa' * 32},{'bb' * 32},"
        f'"AES-CBC-256 [RFC3602]",{"cc" * 48},{"dd" * 48},"HMAC_SHA2_384_192 [RFC4868]"\n'
    )


@pytest.mark.parametrize(("encr", "key_len", "name"), [
    ("aes128", 16, "AES-CBC-128 [RFC3602]"),
    ("aes192", 24, "AES-CBC-192 [RFC3602]"),
    ("aes256", 32, "AES-CBC-256 [RFC3602]"),
])
@pytest.mark.parametrize(("integ", "integ_len", "integ_name"), [
    ("sha256", 32, "HMAC_SHA2_256_128 [RFC4868]"),
    ("sha2_512", 64, "HMAC_SHA2_512_256 [RFC4868]"),
])
def test_ikev2_names(encr: str, key_len: int, name: str, integ: str, integ_len: int,
                     integ_name: str) -> None:
    f = fields(ikev2_line(SPI_I, SPI_R, b"\1" * key_len, b"\2" * key_len, encr,
                          b"\3" * integ_len, b"\4" * integ_len, integ))
    assert (f[4], f[7]) == (name, integ_name)


@pytest.mark.parametrize(("encr", "name"), [
    ("aes192gcm16", "AES-GCM-192 with 16 octet ICV [RFC5282]"),
    ("aes256gcm128", "AES-GCM-256 with 16 octet ICV [RFC5282]"),
])
def test_ikev2_gcm_names(encr: str, name: str) -> None:
    key_len = 28 if "192" in encr else 36
    assert fields(ikev2_line(SPI_I, SPI_R, b"\1" * key_len, b"\2" * key_len, encr))[4] == name


def test_esp_sa_line_ipv4_aead() -> None:
    line = esp_sa_line("192.0.2.1", "198.51.100.2", 0x0A0B0C0D, "aes128gcm16", bytes(range(20)))
    assert line == (
        '"IPv4","192.0.2.1","198.51.100.2","0x0a0b0c0d",'
        '"AES-GCM with 16 octet ICV [RFC4106]","0x000102030405060708090a0b0c0d0e0f10111213",'
        '"NULL",""\n'
    )


def test_esp_sa_line_ipv6_cbc() -> None:
    line = esp_sa_line(ipaddress.ip_address("2001:db8::1"), "2001:db8:ffff::2", 0x100,
                       "aes256", b"\x11" * 32, "sha512", b"\x22" * 64)
    assert line == (
        '"IPv6","2001:db8::1","2001:db8:ffff::2","0x00000100","AES-CBC [RFC3602]",'
        f'"0x{"11" * 32}","HMAC-SHA-512-256 [RFC4868]","0x{"22" * 64}"\n'
    )


@pytest.mark.parametrize(("alg", "encr", "auth"), [
    ("aes256gcm16", "AES-GCM with 16 octet ICV [RFC4106]", "NULL"),
    ("chacha20poly1305", "ChaCha20 with Poly1305 [RFC7634]", "NULL"),
    ("aes128-sha256", "AES-CBC [RFC3602]", "HMAC-SHA-256-128 [RFC4868]"),
    ("aes192-sha384-esn", "AES-CBC [RFC3602]", "HMAC-SHA-384-192 [RFC4868]"),
    ("aes256-sha512", "AES-CBC [RFC3602]", "HMAC-SHA-512-256 [RFC4868]"),
    ("null-sha256", "NULL", "HMAC-SHA-256-128 [RFC4868]"),
])
def test_esp_names(alg: str, encr: str, auth: str) -> None:
    enc, integ = es.keys_for(alg.removesuffix("-esn"))
    f = fields(esp_sa_line("10.0.0.1", "10.0.0.2", 0x1234, alg, enc, integ_key=integ))
    assert (f[4], f[6]) == (encr, auth)
    assert f[5] == "0x" + enc.hex() and f[7] == ("0x" + integ.hex() if integ else "")


@pytest.mark.parametrize(("args", "match"), [
    ((SPI_I, SPI_R, b"\0" * 32, b"\0" * 32, "chacha20poly1305"), "no ChaCha20"),
    ((SPI_I, SPI_R, b"\0" * 24, b"\0" * 24, "3des", b"\0" * 20, b"\0" * 20, "sha1"), "3des"),
    ((SPI_I, SPI_R, b"\0" * 16, b"\0" * 16, "aes128", b"\0" * 16, b"\0" * 16, "md5"), "md5"),
    ((SPI_I, SPI_R, b"\0" * 16, b"\0" * 16, "aes128"), "needs an integrity"),
    ((SPI_I, SPI_R, b"\0" * 20, b"\0" * 20, "aes128gcm16", b"", b"", "sha256"), "AEAD"),
    ((SPI_I, SPI_R, b"\0" * 16, b"\0" * 16, "aes128gcm16"), "SK_ei: 16 bytes"),  # no salt
    ((SPI_I, SPI_R, b"\0" * 16, b"\0" * 16, "aes128", b"\0" * 20, b"\0" * 32, "sha256"),
     "SK_ai"),
    ((SPI_I[:4], SPI_R, b"\0" * 20, b"\0" * 20, "aes128gcm16"), "SPIi"),
    ((1 << 64, SPI_R, b"\0" * 20, b"\0" * 20, "aes128gcm16"), "SPIi"),
])
def test_ikev2_rejects(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ikev2_line(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "match"), [
    (("10.0.0.1", "10.0.0.2", 256, "aes128-md5", b"\0" * 16, None, b"\0" * 16), "md5"),
    (("10.0.0.1", "10.0.0.2", 256, "3des-sha256", b"\0" * 24, None, b"\0" * 32), "3des"),
    (("10.0.0.1", "10.0.0.2", 256, "aes128gcm16", b"\0" * 16), "encryption key: 16 bytes"),
    (("10.0.0.1", "10.0.0.2", 256, "aes128", b"\0" * 16, "sha256", b"\0" * 16), "integrity"),
    (("10.0.0.1", "10.0.0.2", 256, "aes128gcm16", b"\0" * 20, None, b"\0" * 4), "AEAD"),
    (("10.0.0.1", "2001:db8::1", 256, "aes128gcm16", b"\0" * 20), "families"),
    (("10.0.0.1", "10.0.0.2", 1 << 32, "aes128gcm16", b"\0" * 20), "SPI"),
    (("10.0.0.1", "not an address", 256, "aes128gcm16", b"\0" * 20), "address"),
])
def test_esp_rejects(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        esp_sa_line(*args)  # type: ignore[arg-type]


def test_ike_suite_keywords() -> None:
    assert ike_suite_keywords(EncrId.ENCR_AES_CBC, 256, IntegId.AUTH_HMAC_SHA2_256_128) == (
        "aes256", "sha256")
    assert ike_suite_keywords(EncrId.ENCR_AES_GCM_16, 128, None) == ("aes128gcm16", None)
    assert ike_suite_keywords(EncrId.ENCR_AES_GCM_16, 256, IntegId.NONE) == ("aes256gcm16", None)
    for keyword in ("aes128gcm16-prfsha256-x25519", "aes256-sha512-modp2048",
                    "aes192-sha384-ecp384"):
        s = parse_ike_proposal(keyword).suite
        enc, integ = ike_suite_keywords(s.encr, s.encr_key_bits, s.integ)
        assert keyword.startswith(f"{enc}-{integ}" if integ else enc)
    with pytest.raises(ValueError):
        ike_suite_keywords(EncrId.ENCR_3DES, 192, IntegId.AUTH_HMAC_SHA2_256_128)


# -- the files --------------------------------------------------------------------------------

def test_files_are_0600_appended_and_read_back(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    with KeyLog(d) as kl:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for name in (IKEV2_TABLE_FILE, ESP_SA_FILE):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
        kl.log_ike_sa(SPI_I, SPI_R, b"\x01" * 20, b"\x02" * 20, "aes128gcm16")
        kl.log_esp_sa("192.0.2.1", "198.51.100.2", 0xC0FFEE01, "aes256gcm16", b"\x03" * 36)
        # Written through at once: another reader sees the line before close.
        assert len(data_lines(d / ESP_SA_FILE)) == 1
    with KeyLog(d) as kl:  # a second run appends, with no second header
        kl.log_ike_sa(SPI_R, SPI_I, b"\x04" * 16, b"\x05" * 16, "aes128", b"\x06" * 32,
                      b"\x07" * 32, "sha256")
    text = (d / IKEV2_TABLE_FILE).read_text()
    assert text.count("#") == 1 and text.startswith("# ")
    first, second = (fields(line) for line in data_lines(d / IKEV2_TABLE_FILE))
    assert [bytes.fromhex(x) for x in first[:4]] == [SPI_I, SPI_R, b"\x01" * 20, b"\x02" * 20]
    assert first[5:7] == ["", ""]
    assert [bytes.fromhex(x) for x in second[5:7]] == [b"\x06" * 32, b"\x07" * 32]
    [esp] = (fields(line) for line in data_lines(d / ESP_SA_FILE))
    assert esp[:4] == ["IPv4", "192.0.2.1", "198.51.100.2", "0xc0ffee01"]
    assert int(esp[3], 16) == 0xC0FFEE01 and bytes.fromhex(esp[5][2:]) == b"\x03" * 36


def test_existing_file_is_tightened_and_symlinks_refused(tmp_path: Path) -> None:
    (tmp_path / ESP_SA_FILE).write_text("")
    os.chmod(tmp_path / ESP_SA_FILE, 0o644)
    KeyLog(tmp_path).close()
    assert stat.S_IMODE((tmp_path / ESP_SA_FILE).stat().st_mode) == 0o600
    other = tmp_path / "other"
    other.mkdir()
    (other / "target").write_text("")
    os.symlink(other / "target", other / IKEV2_TABLE_FILE)
    with pytest.raises(OSError):
        KeyLog(other)
    assert (other / "target").read_text() == ""


def test_bad_sa_writes_nothing_and_closed_log_refuses(tmp_path: Path) -> None:
    kl = KeyLog(tmp_path)
    with pytest.raises(ValueError):
        kl.log_esp_sa("10.0.0.1", "10.0.0.2", 256, "aes128gcm16", b"short")
    assert data_lines(tmp_path / ESP_SA_FILE) == []
    kl.close()
    kl.close()
    with pytest.raises(ValueError, match="closed"):
        kl.log_esp_sa("10.0.0.1", "10.0.0.2", 256, "aes128gcm16", b"\0" * 20)


def test_esp_chacha20_can_be_refused(tmp_path: Path) -> None:
    with KeyLog(tmp_path, esp_chacha20=False) as kl:
        with pytest.raises(ValueError, match="ChaCha20"):
            kl.log_esp_sa("10.0.0.1", "10.0.0.2", 256, "chacha20poly1305", b"\0" * 36)
        kl.log_esp_sa("10.0.0.1", "10.0.0.2", 256, "aes128gcm16", b"\0" * 20)
    assert len(data_lines(tmp_path / ESP_SA_FILE)) == 1


def test_sa_records_in_both_directions(tmp_path: Path) -> None:
    out = es.record("aes128-sha256", Mode.TUNNEL, 4, Direction.OUT, spi=0x1001)
    inb = es.record("aes128-sha256", Mode.TUNNEL, 4, Direction.IN, spi=0x1002)
    ah = SaRecord(spi=0x1003, direction=Direction.OUT, alg="sha256",
                  local_addr=out.local_addr, remote_addr=out.remote_addr,
                  protocol=Protocol.AH, integ_key=b"\0" * 32)
    with KeyLog(tmp_path) as kl:
        assert kl.log_sa_record(out) and kl.log_sa_record(inb)
        assert not kl.log_sa_record(ah)
    a, b = (fields(line) for line in data_lines(tmp_path / ESP_SA_FILE))
    assert (a[1], a[2]) == (str(out.local_addr), str(out.remote_addr))
    assert (b[1], b[2]) == (str(inb.remote_addr), str(inb.local_addr))
    assert a[5] == "0x" + out.enc_key.hex() and a[7] == "0x" + out.integ_key.hex()


# -- tshark decrypts what espline sent, from the key log alone --------------------------------

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None and os.environ.get("ESPLINE_REQUIRE_TSHARK") != "1",
    reason="tshark is not installed (ESPLINE_REQUIRE_TSHARK=1 makes this a failure)")


def tshark(profile: Path, capture: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if TSHARK is None:
        pytest.fail("ESPLINE_REQUIRE_TSHARK=1 but tshark is not installed")
    # The key log directory is the configuration profile: its esp_sa and
    # ikev2_decryption_table are the tables tshark loads.
    env = {**os.environ, "WIRESHARK_CONFIG_DIR": str(profile)}
    return subprocess.run([TSHARK, "-n", "-r", str(capture), *args], env=env,
                          capture_output=True, text=True, timeout=30, check=False)


def table_errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "Error loading table" in line]


def write_pcap(path: Path, packets: list[bytes]) -> None:
    from scapy.utils import wrpcap
    wrpcap(str(path), [es.parse(p) for p in packets])


def _tshark_has_esp_chacha20(tmp: Path) -> bool:
    with KeyLog(tmp) as kl:
        kl.log_esp_sa("10.0.0.1", "10.0.0.2", 256, "chacha20poly1305", b"\0" * 36)
    write_pcap(tmp / "empty.pcap", [])
    return not table_errors(tshark(tmp, tmp / "empty.pcap", "-o",
                                   "esp.enable_encryption_decode:TRUE"))


ESP_CASES = [  # (algorithm, outer family, UDP encapsulation)
    ("aes128gcm16", 4, False),
    ("aes256gcm16", 6, True),
    ("aes128-sha256", 4, False),
    ("aes256-sha512", 6, False),
    ("aes192-sha384", 4, True),
    ("null-sha256", 4, False),
]


@needs_tshark
def test_tshark_decrypts_esp_with_the_key_log(tmp_path: Path) -> None:
    algs = list(ESP_CASES)
    if _tshark_has_esp_chacha20(tmp_path / "probe"):
        algs.append(("chacha20poly1305", 4, False))
    profile = tmp_path / "profile"
    packets: list[bytes] = []
    want: list[tuple[int, str]] = []
    with KeyLog(profile) as kl:
        for n, (alg, family, udp) in enumerate(algs):
            spi = 0x5000 + n
            ours, out, _, _ = es.pair(alg, Mode.TUNNEL, family, spi=spi, udp=udp)
            inner = [es.inner_packet(4, 40 + n, salt=n * 8 + i) for i in range(2)]
            packets += es.encap(ours, out, inner).packets()
            want += [(spi, es.payload(40 + n, n * 8 + i).hex()) for i in range(2)]
            kl.log_sa_record(es.record(alg, Mode.TUNNEL, family, Direction.OUT, spi=spi,
                                       udp=udp))
    write_pcap(tmp_path / "esp.pcap", packets)
    result = tshark(profile, tmp_path / "esp.pcap",
                    "-o", "esp.enable_encryption_decode:TRUE",
                    "-o", "esp.enable_authentication_check:TRUE",
                    "-T", "fields", "-E", "separator=/t",
                    "-e", "esp.spi", "-e", "esp.icv_good", "-e", "ip.src", "-e", "udp.dstport",
                    "-e", "data.data")
    assert result.returncode == 0, result.stderr
    assert table_errors(result) == []
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == len(want)
    for (spi, payload), (got_spi, icv_good, src, dport, data) in zip(want, rows, strict=True):
        assert int(got_spi, 16) == spi
        assert icv_good == "1", (hex(spi), icv_good)  # the ICV verified with the logged key
        assert "10.1.0.1" in src.split(",")  # the inner header, decrypted
        assert dport.split(",")[-1] == "5678"
        assert data == payload


def ike_exchange(proposal: str, seed: int) -> tuple[list[bytes], IkeSa]:
    """An IKE_SA_INIT + IKE_AUTH exchange between two in-memory IKE SAs, as IPv4/UDP
    packets, and the initiator."""
    from scapy.layers.inet import IP, UDP

    from tests.test_ike_sa import I_ADDR, R_ADDR, configs, seeded

    i_cfg, r_cfg = configs()
    proposals = (parse_ike_proposal(proposal),)
    i = IkeSa(replace(i_cfg, proposals=proposals), initiator=True, local=I_ADDR,
              remote=R_ADDR, random=seeded(seed))
    r = IkeSa(replace(r_cfg, proposals=proposals), initiator=False, local=R_ADDR,
              remote=I_ADDR, random=seeded(seed + 1))
    i.initiate(0.0)
    frames = []
    for _ in range(10):
        moved = False
        for src, dst in ((i, r), (r, i)):
            for data, _addr in src.datagrams_to_send(0.0):
                moved = True
                frames.append(bytes(IP(src=src.local[0], dst=dst.local[0])
                                    / UDP(sport=500, dport=500) / data))
                dst.receive_datagram(data, src.local, 0.0)
        if not moved:
            break
    return frames, i


@needs_tshark
def test_tshark_decrypts_ike_with_the_key_log(tmp_path: Path) -> None:
    profile = tmp_path / "profile"
    frames: list[bytes] = []
    with KeyLog(profile) as kl:
        for seed, proposal in ((10, "aes128gcm16-prfsha256-x25519"),
                               (20, "aes256-sha384-x25519")):
            new, i = ike_exchange(proposal, seed)
            frames += new
            # The keys as the IKE SA derived them (what the gateway logs at establishment).
            keys, suite = i.keys, i.suite
            assert keys is not None and suite is not None
            enc, integ = ike_suite_keywords(suite.encr, suite.encr_key_bits, suite.integ)
            kl.log_ike_sa(i.spi_i, i.spi_r, keys.sk_ei, keys.sk_er, enc, keys.sk_ai,
                          keys.sk_ar, integ)
    write_pcap(tmp_path / "ike.pcap", frames)
    result = tshark(profile, tmp_path / "ike.pcap", "-T", "fields", "-E", "separator=/t",
                    "-e", "isakmp.exchangetype", "-e", "isakmp.id.data.fqdn")
    assert result.returncode == 0, result.stderr
    assert table_errors(result) == []
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    # Per exchange: IKE_SA_INIT both ways (clear), then IKE_AUTH both ways, whose identities
    # are only readable once decrypted.
    assert [r[0] for r in rows] == ["34", "34", "35", "35"] * 2
    auth = [r[1] for r in rows if r[0] == "35"]
    assert all("gw-b.example.net" in ids for ids in auth)
    assert all("gw-a.example.net" in ids for ids in auth[0::2])
