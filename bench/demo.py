"""``espline demo``: the embedded default. Two sites, an IKEv2 tunnel, traffic, a summary.

    netns espb-<pid>-<n>l ("site A")                 netns espb-<pid>-<n>r ("site B")
    lo 10.1.0.1/32 ---- espline [espl0 | 192.0.2.1] ==IKEv2 + ESP== [192.0.2.2] espline (or
                                                                     strongSwan) ---- lo 10.2.0.1

It builds both namespaces (bench/lab.py), starts two espline gateways from an embedded
configuration (PSK, ``aes128gcm16-prfsha256-x25519``, ESP ``aes128gcm16``; site A initiates),
waits for the tunnel, pushes a TCP stream through it for ``--seconds`` with a live progress
line, measures the RTT, prints a summary table (time to establish, throughput, packets, drops
by reason, rekeys), writes it as JSON with ``--json``, removes everything it created and exits
0. ``--peer strongswan`` puts Debian's charon (kernel-libipsec) on site B instead.

Needs root (network namespaces, TUN devices, AF_PACKET sockets); without it, it says so and
exits 2. The traffic tools run inside the namespaces as ``python -m bench.demo sink|source``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.lab import REPO_ROOT, Lab, Side, sigterm_as_interrupt

PSK = "espline demo pre-shared key"  # the demo's own two namespaces, nothing else
IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"
ESP_PROPOSAL = "aes128gcm16"
PORT = 5201
CHUNK = 64 * 1024


def gateway_id(side: Side) -> str:
    return f"site-{side.name[-1]}.demo.espline"


def espline_config(side: Side, rundir: Path, *, initiator: bool, encap: bool, workers: int,
                   rekey: float) -> str:
    child_rekey = f"{rekey:g}s" if rekey else "1h"
    return textwrap.dedent(f"""\
        controller: {{vici_socket: {rundir}/vici.sock}}
        dataplane:
          workers: {workers}
          inside: {{mode: tun, name: espl0}}
          outside: {{mode: af_packet, interface: {side.dev}}}
          endpoints: {{runtime_dir: {rundir}}}
        connections:
          demo:
            version: 2
            local_addrs: [{side.outer}]
            remote_addrs: [{side.peer_outer}]
            proposals: [{IKE_PROPOSAL}]
            encap: {"yes" if encap else "no"}
            local: {{auth: psk, id: {gateway_id(side)}}}
            remote: {{auth: psk, id: site-{"r" if side.name.endswith("l") else "l"}.demo.espline}}
            children:
              net:
                local_ts: [{side.net}]
                remote_ts: [{side.peer_net}]
                esp_proposals: [{ESP_PROPOSAL}]
                start_action: {"start" if initiator else "none"}
                rekey_time: {child_rekey}
        secrets:
          ike:
            - {{secret: "{PSK}"}}
        """)


# -- traffic tools (run inside a namespace) ------------------------------------------------------

def tool_sink(args: argparse.Namespace) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((args.bind, args.port))
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        total = 0
        with conn:
            while data := conn.recv(1 << 20):
                total += len(data)
        print(json.dumps({"received": total}), flush=True)
    return 0


def tool_source(args: argparse.Namespace) -> int:
    """Send for ``--seconds``; a JSON progress line every 0.25 s, the last one final."""
    payload = os.urandom(CHUNK)
    with socket.create_connection((args.to, args.port), timeout=10,
                                  source_address=(args.bind, 0)) as conn:
        start = last = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < args.seconds:
            conn.sendall(payload)
            sent += len(payload)
            if now - last >= 0.25:
                print(json.dumps({"t": now - start, "sent": sent}), flush=True)
                last = now
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the sink closes once it read everything
        elapsed = time.monotonic() - start
    print(json.dumps({"t": elapsed, "sent": sent, "done": True}), flush=True)
    return 0


# -- the demo ------------------------------------------------------------------------------------

class Demo:
    def __init__(self, lab: Lab, work: Path, args: argparse.Namespace) -> None:
        self.lab, self.work, self.args = lab, work, args
        self.gateways: list[tuple[Side, subprocess.Popen[Any], Path]] = []
        self.charon: Any = None

    def start(self) -> float:
        """Start both gateways; returns the seconds until the first ping crossed the tunnel."""
        left, right = self.lab.sides
        encap = self.args.peer == "strongswan"  # kernel-libipsec speaks ESP-in-UDP only
        if self.args.peer == "strongswan":
            from bench.strongswan import Charon, missing, swanctl_conf

            why = missing()
            if why is not None:
                raise RuntimeError(why)
            self.charon = Charon(lambda argv, **kw: self.lab.popen(right, argv, **kw),
                                 self.work / "charon")
            self.charon.write(swanctl_conf(
                local=right.outer, remote=right.peer_outer, local_id=gateway_id(right),
                remote_id=gateway_id(left), local_ts=right.net, remote_ts=right.peer_net,
                psk=PSK, proposals=IKE_PROPOSAL, esp_proposals=ESP_PROPOSAL,
                # swanctl.conf takes whole seconds only
                child_rekey_time=f"{max(1, round(self.args.rekey))}s" if self.args.rekey
                else "1h"))
            self.charon.start()
            sides = [left]
        else:
            sides = [right, left]  # the responder first
        t0 = time.monotonic()
        for side in sides:
            self._start_espline(side, initiator=side is left, encap=encap)
        ok = self._ping_until_up(left, timeout=30.0)
        if not ok:
            raise RuntimeError("the tunnel did not come up within 30 s\n" + self.logs())
        return time.monotonic() - t0

    def _start_espline(self, side: Side, *, initiator: bool, encap: bool) -> None:
        tag = side.name[-1]
        rundir = self.work / f"espline-{tag}"
        path = self.work / f"espline-{tag}.yaml"
        path.write_text(espline_config(side, rundir, initiator=initiator, encap=encap,
                                       workers=self.args.workers, rekey=self.args.rekey))
        path.chmod(0o600)
        log = open(self.work / f"espline-{tag}.log", "w")  # noqa: SIM115 (closed below)
        try:
            proc = self.lab.popen(side, [sys.executable, "-m", "controller.cli", "run", "-c",
                                         str(path)], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=REPO_ROOT)
        finally:
            log.close()
        self.gateways.append((side, proc, rundir))

    def _ping_until_up(self, side: Side, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s, proc, _ in self.gateways:
                if proc.poll() is not None:
                    raise RuntimeError(f"espline in {s.name} exited with {proc.returncode}\n"
                                       + self.logs())
            res = subprocess.run(side.exec_argv([sys.executable, "-m", "bench.lab", "ping",
                                                 side.peer_inner, "--src", side.inner,
                                                 "--timeout", "0.5"]),
                                 capture_output=True, cwd=REPO_ROOT, check=False)
            if res.returncode == 0:
                return True
        return False

    def traffic(self) -> dict[str, Any]:
        left, right = self.lab.sides
        sink = self.lab.popen(right, [sys.executable, "-m", "bench.demo", "sink", "--bind",
                                      right.inner, "--port", str(PORT)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, tool=True)
        assert sink.stdout is not None
        if sink.stdout.readline().strip() != "ready":
            raise RuntimeError("the traffic sink did not start")
        source = self.lab.popen(left, [sys.executable, "-m", "bench.demo", "source", "--to",
                                       right.inner, "--bind", left.inner, "--port", str(PORT),
                                       "--seconds", str(self.args.seconds)],
                                stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, tool=True)
        assert source.stdout is not None
        final: dict[str, Any] = {}
        tty = sys.stdout.isatty()
        for line in source.stdout:
            with contextlib.suppress(ValueError):
                final = json.loads(line)
            if final.get("t"):
                rate = final["sent"] * 8 / final["t"] / 1e6
                bar = "#" * int(min(1.0, final["t"] / self.args.seconds) * 30)
                text = (f"  traffic {final['t']:4.1f}/{self.args.seconds:g} s  [{bar:<30}]  "
                        f"{final['sent'] / 1e6:8.1f} MB  {rate:7.1f} Mbit/s")
                if tty:
                    print("\r" + text, end="", flush=True)
                elif final.get("done"):
                    print(text, flush=True)
        if tty:
            print(flush=True)
        source.wait(30)
        out, _ = sink.communicate(timeout=30)
        received = json.loads(out.strip().splitlines()[-1])["received"] if out.strip() else 0
        if not final.get("done"):
            raise RuntimeError("the traffic source failed\n" + self.logs())
        return {"seconds": final["t"], "bytes_sent": final["sent"],
                "bytes_received": received,
                "throughput_mbit_s": received * 8 / final["t"] / 1e6}

    def stop(self) -> list[int | None]:
        codes = []
        for _side, proc, _ in reversed(self.gateways):
            codes.append(self.lab.stop(proc, grace=15.0))
        if self.charon is not None:
            self.charon.stop()
        return codes

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"packets_out": 0, "packets_in": 0, "drops": {},
                               "lost_batches": 0}
        for side, _, rundir in self.gateways:
            with contextlib.suppress(OSError, ValueError):
                st = json.loads((rundir / "stats.json").read_text())
                if side is self.lab.left:
                    out["packets_out"] = st["outbound"]["passed"]
                    out["packets_in"] = st["inbound"]["passed"]
                for part in ("outbound", "inbound"):
                    for reason, n in st[part]["drops"].items():
                        key = f"{side.name[-1]}:{part[:-5]}:{reason}"
                        out["drops"][key] = out["drops"].get(key, 0) + n
                out["lost_batches"] += st["lost_batches"]
        return out

    def rekeys(self) -> int:
        """Rekeys of the tunnel, as site A's gateway saw them (both sides log each one)."""
        with contextlib.suppress(OSError):
            text = (self.work / f"espline-{self.lab.left.name[-1]}.log").read_text()
            return len(re.findall(r"CHILD_SA \S+ rekeyed|IKE SA rekeyed", text))
        return 0

    def logs(self) -> str:
        parts = []
        for side, _, _ in self.gateways:
            with contextlib.suppress(OSError):
                text = (self.work / f"espline-{side.name[-1]}.log").read_text()
                parts.append(f"--- espline {side.name}\n" + "\n".join(text.splitlines()[-25:]))
        if self.charon is not None:
            parts.append(self.charon.log())
        return "\n".join(parts)


def table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("espline demo needs root: it creates network namespaces, TUN devices and "
              "AF_PACKET sockets (try: sudo espline demo, or make demo as root)",
              file=sys.stderr)
        return 2
    sigterm_as_interrupt()
    peer = "strongSwan (kernel-libipsec)" if args.peer == "strongswan" else "espline"
    print(f"espline demo: site A (espline) <-> site B ({peer}), IKEv2 PSK {IKE_PROPOSAL}, "
          f"ESP {ESP_PROPOSAL}, {args.workers} worker(s) per gateway")
    with tempfile.TemporaryDirectory(prefix="espline-demo-") as tmp, Lab() as lab:
        demo = Demo(lab, Path(tmp), args)
        try:
            print("  building two sites in network namespaces ...", flush=True)
            lab.up()
            print("  starting the gateways, negotiating IKEv2 ...", flush=True)
            established = demo.start()
            print(f"  tunnel up after {established:.2f} s", flush=True)
            result = demo.traffic()
            pings = _rtt_in(lab.left)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"espline demo failed: {exc}", file=sys.stderr)
            demo.stop()
            return 1
        rekeys = demo.rekeys()
        codes = demo.stop()
        stats = demo.stats()
    rtts = sorted(pings.get("rtt_ms", []))
    summary = {
        "peer": args.peer, "ike_proposal": IKE_PROPOSAL, "esp_proposal": ESP_PROPOSAL,
        "establish_s": established, **result,
        "rtt_ms_median": rtts[len(rtts) // 2] if rtts else None,
        "pings": f"{pings.get('received', 0)}/{pings.get('sent', 0)}",
        **stats, "rekeys": rekeys, "exit_codes": codes,
    }
    drops = ", ".join(f"{k} {v}" for k, v in sorted(stats["drops"].items())) or "none"
    print("\nsummary")
    print(table([
        ("time to establish", f"{established:.2f} s"),
        ("throughput (TCP, A->B)", f"{result['throughput_mbit_s']:.1f} Mbit/s over "
                                   f"{result['seconds']:.1f} s"),
        ("bytes through the tunnel", f"{result['bytes_received']:,}"),
        ("ESP packets out / in (A)", f"{stats['packets_out']:,} / {stats['packets_in']:,}"),
        ("RTT through the tunnel", f"{summary['rtt_ms_median']:.2f} ms median, "
                                   f"{summary['pings']} answered"
         if rtts else "no answers"),
        ("drops by reason", drops),
        ("lost batches", str(stats["lost_batches"])),
        ("rekeys", str(rekeys)),
    ]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    ok = (result["bytes_received"] == result["bytes_sent"] and all(c == 0 for c in codes))
    if not ok:
        print(f"espline demo: not every byte arrived or a gateway failed (exit codes {codes})",
              file=sys.stderr)
    return 0 if ok else 1


def _rtt_in(side: Side) -> dict[str, Any]:
    res = subprocess.run(side.exec_argv([sys.executable, "-m", "bench.lab", "rtt",
                                         side.peer_inner, "--src", side.inner, "--count", "20",
                                         "--interval", "0.02"]),
                         capture_output=True, text=True, cwd=REPO_ROOT, check=False, timeout=30)
    with contextlib.suppress(ValueError):
        return dict(json.loads(res.stdout))
    return {}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="espline demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="traffic time (default 5)")
    p.add_argument("--peer", choices=("espline", "strongswan"), default="espline",
                   help="what runs site B's gateway (default espline)")
    p.add_argument("--workers", type=int, default=2, help="workers per espline gateway")
    p.add_argument("--rekey", type=float, default=0.0,
                   help="Child SA rekey time in seconds (default: 1 h, i.e. none in a demo)")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sink"], ["source"]):
        tools = argparse.ArgumentParser(prog="python -m bench.demo")
        tools.add_argument("tool", choices=("sink", "source"))
        tools.add_argument("--bind", required=True)
        tools.add_argument("--to")
        tools.add_argument("--port", type=int, default=PORT)
        tools.add_argument("--seconds", type=float, default=5.0)
        args = tools.parse_args(argv)
        return tool_sink(args) if args.tool == "sink" else tool_source(args)
    return run_demo(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
