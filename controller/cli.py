"""The ``espline`` command line: one entry point for the daemon, the demo and admin commands.

Only the subcommands that exist are wired; each later part of the system adds its own.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("espline")
    except PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="espline",
        description="IPsec VPN concentrator: IKEv2 controller and vectorized ESP/AH data plane.",
    )
    parser.add_argument("--version", action="version", version=f"espline {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from controller.admin import add_admin_parsers

    admin = add_admin_parsers(sub)
    bench = sub.add_parser(
        "bench", help="ESP codec benchmark on one core",
        description="Runs bench/esp_codec.py; extra arguments are passed on to it.")
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="arguments for bench.esp_codec (see: espline bench --help-bench)")
    run = sub.add_parser("run", help="run the gateway in the foreground: IKE controller and "
                         "data plane (connections), or the data plane alone (static_sas)")
    run.add_argument("-c", "--config", required=True, help="espline YAML configuration")
    sub.add_parser("demo", help="two sites in network namespaces, an IKEv2 tunnel, traffic "
                   "and a summary (needs root; see espline demo --help)", add_help=False)
    argv_given = argv
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from bench import demo

        return demo.main(argv[1:])
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to the benchmark's own parser.
        from bench import esp_codec

        passed = argv[1:]
        if passed[:1] == ["--help-bench"]:
            passed = ["--help"]
        if not passed:
            # The demo: the figures the target names, in about a minute.
            passed = ["--algs", "aes128gcm16,chacha20poly1305,aes128-sha256",
                      "--modes", "tunnel", "--sizes", "64,512,1400", "--seconds", "1"]
        return esp_codec.main(passed)
    args = parser.parse_args(argv)
    if (code := admin(args)) is not None:
        return int(code)
    if args.command == "run":
        from controller.run import main as run_main

        # Called as the program (not with an argv from a caller in the same process), it
        # may execute itself again (pipeline/heap.py).
        return run_main(args.config, reexec=argv_given is None)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
