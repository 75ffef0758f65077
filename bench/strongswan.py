"""strongSwan's charon as a reference peer inside a network namespace (tests, demo, benchmarks).

The recipe of shared/reference/strongswan-peer.md: Debian's charon with the userspace
kernel-libipsec data plane (TUN ``ipsec0``; ESP always UDP-encapsulated, and NAT detection
faked so IKE moves to port 4500), its own strongswan.conf (``STRONGSWAN_CONF``) and swanctl
directory (``SWANCTL_DIR``), and its compiled-in ``/run/charon.pid`` kept per instance by
bind-mounting a private directory over ``/run`` in the mount namespace ``ip netns exec``
gives the command. Whoever owns the namespace (tests/netns.py, bench/lab.py) kills the
process by PID at teardown whatever happens; ``spawn`` is its way of starting a process there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = ("random nonce openssl aes sha1 sha2 hmac gcm kdf pem pkcs1 x509 pubkey curve25519 "
           "gmp kernel-libipsec kernel-netlink socket-default vici")


def missing() -> str | None:
    """Why strongSwan cannot run here, or None."""
    absent = [t for t in (CHARON, shutil.which("swanctl")) if not t or not os.access(t, os.X_OK)]
    if absent:
        return ("strongSwan is not installed (apt-get install strongswan-charon "
                "strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins "
                "libstrongswan-extra-plugins)")
    return None


@dataclass
class Charon:
    spawn: Callable[..., subprocess.Popen[Any]]  # (argv, **Popen kwargs) in the namespace
    work: Path
    proc: subprocess.Popen[Any] | None = None

    @property
    def vici(self) -> Path:
        return self.work / "charon.vici"

    @property
    def log_path(self) -> Path:
        return self.work / "charon.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "STRONGSWAN_CONF": str(self.work / "strongswan.conf"),
                "SWANCTL_DIR": str(self.work / "swanctl")}

    def write(self, swanctl_conf: str, *, options: Mapping[str, object] | None = None,
              ike_log_level: int = 2, flush_log: bool = True) -> None:
        """Write strongswan.conf and swanctl.conf; ``options`` adds ``charon.<key> = value``
        settings (e.g. ``rsa_pss``, or the DoS-protection knobs a load test turns off)."""
        for sub in ("conf.d", "x509", "x509ca", "private", "rsa", "ecdsa", "pkcs8"):
            (self.work / "swanctl" / sub).mkdir(parents=True, exist_ok=True)
        (self.work / "run").mkdir(parents=True, exist_ok=True)
        extra = "".join(f"\n                {k} = {v}" for k, v in (options or {}).items())
        (self.work / "strongswan.conf").write_text(textwrap.dedent(f"""\
            charon {{
                load = {PLUGINS}
                port = 500
                port_nat_t = 4500
                install_routes = yes
                install_virtual_ip = no
                retransmit_tries = 3
                retransmit_timeout = 1.0{extra}
                plugins {{
                    vici {{
                        socket = unix://{self.vici}
                    }}
                    kernel-libipsec {{
                        allow_peer_ts = no
                    }}
                }}
                filelog {{
                    test {{
                        path = {self.log_path}
                        time_format = %H:%M:%S
                        append = yes
                        flush_line = {"yes" if flush_log else "no"}
                        default = 1
                        ike = {ike_log_level}
                    }}
                }}
                syslog {{
                    daemon {{
                        default = -1
                    }}
                }}
            }}
            swanctl {{
                socket = unix://{self.vici}
            }}
            """))
        conf = self.work / "swanctl" / "swanctl.conf"
        conf.write_text(swanctl_conf)
        conf.chmod(0o600)

    def start(self, timeout: float = 15.0) -> None:
        real = os.path.realpath(self.work)
        assert not real.startswith(("/run/", "/var/run/")), "state must not be under /run"
        script = 'mount --bind "$0" /run || exit 1; exec "$1"'
        with open(self.work / "charon.out", "a") as out:
            self.proc = self.spawn(["sh", "-c", script, str(self.work / "run"), CHARON],
                                   env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not (self.vici.exists() and (self.work / "run" / "charon.pid").exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"charon did not come up:\n{self.log()}")
            time.sleep(0.1)
        self.swanctl("--load-all")

    def swanctl(self, *args: str, timeout: float = 30.0, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["swanctl", *args, "--uri", f"unix://{self.vici}"], env=self.env(),
                             capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"swanctl {' '.join(args)} failed ({res.returncode}):\n"
                                 f"{res.stdout}{res.stderr}\n{self.log()}")
        return res

    def list_sas(self) -> str:
        return self.swanctl("--list-sas").stdout

    def log(self) -> str:
        out = []
        for name in ("charon.log", "charon.out"):
            p = self.work / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace")
                                                        .splitlines()[-60:]))
        return "\n".join(out)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def swanctl_conf(*, local: str, remote: str, local_id: str, remote_id: str, local_ts: str,
                 remote_ts: str, psk: str, proposals: str, esp_proposals: str,
                 start_action: str = "none", dpd_delay: str = "0s",
                 rekey_time: str = "4h", child_rekey_time: str = "1h") -> str:
    """A PSK site-to-site connection ``site`` with child ``lan``, as strongSwan's docs write
    it."""
    return textwrap.dedent(f"""\
        connections {{
            site {{
                version = 2
                local_addrs = {local}
                remote_addrs = {remote}
                encap = yes
                mobike = no
                proposals = {proposals}
                dpd_delay = {dpd_delay}
                rekey_time = {rekey_time}
                local {{
                    auth = psk
                    id = {local_id}
                }}
                remote {{
                    auth = psk
                    id = {remote_id}
                }}
                children {{
                    lan {{
                        mode = tunnel
                        local_ts = {local_ts}
                        remote_ts = {remote_ts}
                        esp_proposals = {esp_proposals}
                        start_action = {start_action}
                        rekey_time = {child_rekey_time}
                        dpd_action = clear
                    }}
                }}
            }}
        }}
        secrets {{
            ike-site {{
                id-a = {local_id}
                id-b = {remote_id}
                secret = "{psk}"
            }}
        }}
        """)
