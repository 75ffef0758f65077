"""Certificate authentication against strongSwan (RFC 7296 §2.15, RFC 7427), in the network
namespaces of tests/test_interop_strongswan.py:

    hostA 10.1.0.1 --- gwA espline [192.0.2.1] ==IKE+ESP-in-UDP== [192.0.2.2] gwB charon
        --- 10.2.0.1 hostB

The PKI is made here with ``cryptography`` (tests/test_ike_certs.py's helpers): one root CA,
and under it an intermediate CA for each gateway, so that each side must send its intermediate
in a CERT payload (strongSwan does when it got a CERTREQ: ``send_cert = ifasked``) and check
the other's chain up to the root, the only CA both trust. charon gets its certificate in
``swanctl/x509``, the root and its own intermediate in ``x509ca``, its key in ``rsa/``,
``ecdsa/`` or ``pkcs8/``; espline gets ``authorities`` and ``local.certs``/``local.key``.

Each scenario is data: key types, identities, signature scheme, who initiates; the outcome is a
tunnel that pings both ways and, in charon's log, the signature scheme it verified espline's
AUTH with. ``test_zz_matrix`` prints what ran.
"""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e_support import (
    SIDE_A,
    SIDE_B,
    TUN_NAME,
    WAN,
    Gateway,
    build_topology,
    start_gateway,
    wait_for,
    wait_link,
)
from tests.netns import (
    NetnsLab,
    netns_lab_fixture,  # noqa: F401  (provides the netns_lab fixture)
    require_root_netns,
)
from tests.strongswan import Charon, require_strongswan
from tests.test_ike_certs import Issued, dn, fqdn_sans, issue, new_key

ID_A, ID_B = "gw-a.example.net", "gw-b.example.net"
DN_A, DN_B = (f"C=CH, O=espline, CN={n}" for n in (ID_A, ID_B))
IKE, ESP = "aes128gcm16-prfsha256-x25519", "aes128gcm16"


@dataclass(frozen=True)
class Scenario:
    name: str
    initiator: str  # "espline" or "strongswan"
    espline_key: str  # rsa, p256, p384, ed25519 (tests/test_ike_certs.py's new_key kinds)
    charon_key: str
    espline_auth: str = "pubkey"  # rsa/pss: espline signs with RSASSA-PSS
    charon_pss: bool = False  # strongswan.conf charon.rsa_pss: charon signs with RSASSA-PSS
    ids: str = "fqdn"  # or "dn"
    # charon's log lines "authentication of '<id>' [(myself)] with <scheme> successful": the
    # scheme it verified espline's AUTH with, and the one it signed its own with
    scheme: str = ""
    charon_scheme: str = ""
    charon_trusts_espline: bool = True  # False: charon's trusted root is another CA
    espline_trusts_charon: bool = True  # False: charon's certificate is under another root


ECDSA256, ECDSA384 = "ECDSA_WITH_SHA256_DER", "ECDSA_WITH_SHA384_DER"
PKCS1, PSS = "RSA_EMSA_PKCS1_SHA2_256", "RSA_EMSA_PSS_SHA2_256_SALT_32"
SCENARIOS = [
    Scenario("ecdsa-espline", "espline", "p256", "p256", scheme=ECDSA256,
             charon_scheme=ECDSA256),
    Scenario("ecdsa-strongswan", "strongswan", "p384", "p256", scheme=ECDSA384,
             charon_scheme=ECDSA256),
    Scenario("rsa-espline", "espline", "rsa", "rsa", scheme=PKCS1, charon_scheme=PKCS1),
    Scenario("rsa-strongswan", "strongswan", "rsa", "rsa", scheme=PKCS1, charon_scheme=PKCS1),
    Scenario("rsa-pss", "espline", "rsa", "rsa", espline_auth="rsa/pss", charon_pss=True,
             scheme=PSS, charon_scheme=PSS),
    Scenario("mixed-dn", "strongswan", "p256", "rsa", ids="dn", scheme=ECDSA256,
             charon_scheme=PKCS1),
    Scenario("ed25519", "espline", "ed25519", "ed25519", scheme="ED25519",
             charon_scheme="ED25519"),
]
RESULTS: dict[str, str] = {}


@dataclass
class Lab:
    """The PKI of one scenario, written where espline and charon read it."""

    espline: Issued
    espline_sub: Issued
    charon: Issued
    charon_sub: Issued
    root: Issued
    charon_roots: tuple[Issued, ...]  # the CA charon trusts, and the root of its own chain

    @classmethod
    def make(cls, s: Scenario) -> Lab:
        now = dt.datetime.now(dt.UTC)

        def ca_kind(kind: str) -> str:
            return "rsa" if kind == "rsa" else "p256"

        root = issue("Interop Root CA", new_key("p256", "interop-root"), ca=True, now=now)
        other_root = issue("Interop Root CA", new_key("p256", "interop-other"), ca=True, now=now)
        sub_a = issue("Interop Sub CA A", new_key(ca_kind(s.espline_key), "interop-sub-a"),
                      root, ca=True, now=now)
        charon_root = root if s.charon_trusts_espline else other_root
        chain_root = root if s.espline_trusts_charon else other_root
        sub_b = issue("Interop Sub CA B", new_key(ca_kind(s.charon_key), "interop-sub-b"),
                      chain_root, ca=True, now=now)
        ee_a = issue(ID_A, new_key(s.espline_key, "interop-a"), sub_a, sans=fqdn_sans(ID_A),
                     now=now)
        ee_b = issue(ID_B, new_key(s.charon_key, "interop-b"), sub_b, sans=fqdn_sans(ID_B),
                     now=now)
        assert ee_a.cert.subject == dn(ID_A)
        # charon trusts whatever is in x509ca: the root of its own chain goes there only if
        # that does not make it trust espline's
        roots = (charon_root,)
        if chain_root is not charon_root and s.charon_trusts_espline:
            roots += (chain_root,)
        return cls(ee_a, sub_a, ee_b, sub_b, root, roots)

    def write_espline(self, where: Path) -> dict[str, str]:
        where.mkdir(parents=True, exist_ok=True)
        (where / "root.pem").write_bytes(self.root.pem())
        (where / "gw-a.pem").write_bytes(self.espline.pem() + self.espline_sub.pem())
        key = where / "gw-a.key"
        key.write_bytes(self.espline.key_pem())
        key.chmod(0o600)
        return {"cacert": str(where / "root.pem"), "cert": str(where / "gw-a.pem"),
                "key": str(key)}

    def write_charon(self, swanctl: Path, key_kind: str) -> None:
        (swanctl / "x509" / "gw-b.pem").write_bytes(self.charon.pem())
        for i, root in enumerate(self.charon_roots):
            (swanctl / "x509ca" / f"root-{i}.pem").write_bytes(root.pem())
        (swanctl / "x509ca" / "sub-b.pem").write_bytes(self.charon_sub.pem())
        # PKCS#1 RSA in rsa/, SEC 1 ECDSA in ecdsa/, anything else as PKCS#8 in pkcs8/
        folder = {"rsa": "rsa", "p256": "ecdsa", "p384": "ecdsa"}.get(key_kind, "pkcs8")
        path = swanctl / folder / "gw-b.pem"
        path.write_bytes(self.charon.key_pem(traditional=folder != "pkcs8"))
        path.chmod(0o600)


def espline_yaml(rundir: Path, files: dict[str, str], s: Scenario) -> str:
    local_id, remote_id = (DN_A, DN_B) if s.ids == "dn" else (ID_A, ID_B)
    return textwrap.dedent(f"""\
        controller: {{vici_socket: {rundir}/vici.sock}}
        dataplane:
          workers: 2
          inside: {{mode: tun, name: {TUN_NAME}}}
          outside: {{mode: af_packet, interface: {WAN}}}
          endpoints: {{runtime_dir: {rundir}}}
        authorities:
          interop: {{cacert: {files["cacert"]}}}
        connections:
          site:
            version: 2
            local_addrs: [{SIDE_A.outer}]
            remote_addrs: [{SIDE_B.outer}]
            proposals: [{IKE}]
            encap: yes
            local:
              auth: {s.espline_auth}
              certs: [{files["cert"]}]
              key: {files["key"]}
              id: "{local_id}"
            remote:
              auth: pubkey
              id: "{remote_id}"
            children:
              lan:
                local_ts: [{SIDE_A.net}]
                remote_ts: [{SIDE_B.net}]
                esp_proposals: [{ESP}]
                start_action: {"start" if s.initiator == "espline" else "none"}
        """)


def charon_conf(s: Scenario) -> str:
    local_id, remote_id = (DN_B, DN_A) if s.ids == "dn" else (ID_B, ID_A)
    return textwrap.dedent(f"""\
        connections {{
            site {{
                version = 2
                local_addrs = {SIDE_B.outer}
                remote_addrs = {SIDE_A.outer}
                encap = yes
                mobike = no
                proposals = {IKE}
                local {{
                    auth = pubkey
                    certs = gw-b.pem
                    id = "{local_id}"
                }}
                remote {{
                    auth = pubkey
                    id = "{remote_id}"
                }}
                children {{
                    lan {{
                        mode = tunnel
                        local_ts = {SIDE_B.net}
                        remote_ts = {SIDE_A.net}
                        esp_proposals = {ESP}
                        start_action = none
                    }}
                }}
            }}
        }}
        """)


class CertInterop:
    def __init__(self, lab: NetnsLab, tmp: Path, s: Scenario) -> None:
        self.scenario = s
        self.pki = Lab.make(s)
        self.topo = build_topology(lab, inside="tun")
        self.charon = Charon(self.topo.gw_b.popen, tmp / "charon")
        self.charon.write(charon_conf(s), options={"rsa_pss": "yes"} if s.charon_pss else {})
        self.pki.write_charon(self.charon.work / "swanctl", s.charon_key)
        self.charon.start()
        rundir = tmp / "run-a"
        files = self.pki.write_espline(tmp / "pki-a")
        self.espline: Gateway = start_gateway(self.topo.gw_a, espline_yaml(rundir, files, s),
                                              tmp, "a", rundir)
        wait_link(self.topo.gw_a, TUN_NAME, True)
        if s.initiator == "strongswan":
            wait_for(lambda: "controller up" in self.espline.log(), 20, "espline to listen")
            self.charon.swanctl("--initiate", "--child", "lan", "--timeout", "20",
                                timeout=30,
                                check=s.charon_trusts_espline and s.espline_trusts_charon)

    def logs(self) -> str:
        return f"--- espline\n{self.espline.log()}\n--- strongSwan\n{self.charon.log()}"

    def charon_log(self) -> str:
        return self.charon.log_path.read_text(errors="replace")

    def up(self) -> None:
        wait_for(lambda: "INSTALLED" in self.charon.list_sas(), 30,
                 "strongSwan's CHILD_SA\n" + self.logs())

    def stop(self) -> int:
        try:
            return self.espline.stop()
        finally:
            self.charon.stop()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_certificates_with_strongswan(netns_lab: NetnsLab, tmp_path: Path,
                                      scenario: Scenario) -> None:
    require_root_netns()
    require_strongswan()
    RESULTS[scenario.name] = "FAIL"
    run = CertInterop(netns_lab, tmp_path, scenario)
    try:
        run.up()
        log = run.charon_log()
        # charon checked espline's chain and signature, with the scheme RFC 7427 carried
        verified = re.findall(r"authentication of '([^']*)' with (\S+) successful", log)
        signed = re.findall(r"authentication of '([^']*)' \(myself\) with (\S+) successful", log)
        assert verified and verified[0][1] == scenario.scheme, run.logs()
        # and espline checked charon's, made with this scheme
        assert signed and signed[0][1] == scenario.charon_scheme, run.logs()
        assert "received end entity cert" in log, run.logs()  # espline sent its CERT
        assert run.topo.host_a.ping(SIDE_B.host, timeout=15), "ping a->b\n" + run.logs()
        assert run.topo.host_b.ping(SIDE_A.host, timeout=5), "ping b->a\n" + run.logs()
        assert "ESTABLISHED" in run.charon.list_sas()
    finally:
        code = run.stop()
    assert code == 0, run.logs()
    RESULTS[scenario.name] = f"ok (espline {verified[0][1]}, strongSwan {signed[0][1]})"


@pytest.mark.parametrize("initiator", ["espline", "strongswan"])
def test_untrusted_certificate_fails_authentication(netns_lab: NetnsLab, tmp_path: Path,
                                                    initiator: str) -> None:
    """The initiator's certificate is under a root the responder does not trust: the
    responder answers AUTHENTICATION_FAILED and no Child SA comes up."""
    require_root_netns()
    require_strongswan()
    name = f"untrusted-{initiator}"
    RESULTS[name] = "FAIL"
    run = CertInterop(netns_lab, tmp_path, Scenario(
        name, initiator, "p256", "p256", charon_trusts_espline=initiator == "strongswan",
        espline_trusts_charon=initiator == "espline"))
    try:
        wait_for(lambda: re.search(r"AUTH_FAILED|AUTHENTICATION_FAILED", run.charon_log()), 30,
                 "an AUTHENTICATION_FAILED at charon\n" + run.logs())
        assert "INSTALLED" not in run.charon.list_sas(), run.logs()
        if initiator == "strongswan":
            # espline said why in its log
            wait_for(lambda: "not issued by a trusted CA" in run.espline.log(), 10,
                     "espline's reason\n" + run.logs())
    finally:
        code = run.stop()
    assert code == 0, run.logs()
    RESULTS[name] = "ok (refused)"


def test_zz_matrix() -> None:
    """Print what ran (pytest -s shows it; the closing note quotes it)."""
    if not RESULTS:
        pytest.skip("no interop case ran")
    lines = [f"{name:<22} {result}" for name, result in RESULTS.items()]
    print("\n" + "\n".join(lines))
    assert all(v.startswith("ok") for v in RESULTS.values()), "\n".join(lines)

