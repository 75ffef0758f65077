"""The admin commands of the ``espline`` CLI: VICI requests with swanctl-style output.

``espline list-sas``, ``list-conns``, ``initiate``, ``terminate``, ``rekey``, ``stats``,
``counters`` and ``reload`` talk to the daemon's VICI socket (``--uri unix:///path``, default
``$ESPLINE_VICI`` or ``unix:///run/espline/vici.sock``) and print what ``swanctl`` prints for
the same answer, the decoded tree as JSON (``--json``), or swanctl's ``--raw``/``--pretty``
dump. A daemon that cannot be reached is one line on stderr and exit status 1.

Wiring into an argparse CLI is ``dispatch = add_admin_parsers(subparsers)`` and, after
parsing, ``rc = dispatch(args)`` (None when ``args`` is not an admin command); or call
``run_admin(command, argv)`` directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from controller.config import DEFAULT_VICI_SOCKET
from controller.vici.client import ViciClient, ViciClientError
from controller.vici.protocol import EncodableSection, Section, TextSection, TextValue, to_text

__all__ = [
    "ADMIN_COMMANDS",
    "DEFAULT_URI",
    "ENV_URI",
    "add_admin_parsers",
    "dump_raw",
    "format_conns",
    "format_counters",
    "format_sas",
    "format_stats",
    "main",
    "run_admin",
]

ENV_URI = "ESPLINE_VICI"
DEFAULT_URI = f"unix://{DEFAULT_VICI_SOCKET}"
_REQUEST_TIMEOUT = 60.0
_WAIT_MARGIN = 5.0  # beyond the daemon-side timeout of initiate/terminate


# -- swanctl's --raw / --pretty dump -------------------------------------------------------


def _printable(value: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in value)


def _dump_value(value: bytes) -> str:
    # Non-printable values as swanctl shows them: 0x and the hex digits.
    return value.decode("ascii") if _printable(value) else "0x" + value.hex()


def dump_raw(label: str, tree: Section, pretty: bool = False) -> str:
    """The text ``swanctl --raw`` (or ``--pretty``) prints for a message, with a newline."""
    if not pretty:
        return f"{label} {{{_dump_flat(tree)}}}\n"
    lines = [f"{label} {{"]
    _dump_pretty(tree, 1, lines)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dump_flat(tree: Section) -> str:
    parts: list[str] = []
    for name, value in tree.items():
        if isinstance(value, bytes):
            parts.append(f"{name}={_dump_value(value)}")
        elif isinstance(value, list):
            parts.append(f"{name}=[{' '.join(_dump_value(v) for v in value)}]")
        else:
            parts.append(f"{name} {{{_dump_flat(value)}}}")
    return " ".join(parts)


def _dump_pretty(tree: Section, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for name, value in tree.items():
        if isinstance(value, bytes):
            lines.append(f"{pad}{name} = {_dump_value(value)}")
        elif isinstance(value, list):
            lines.append(f"{pad}{name} = [")
            lines.extend(f"{pad}  {_dump_value(v)}" for v in value)
            lines.append(f"{pad}]")
        else:
            lines.append(f"{pad}{name} {{")
            _dump_pretty(value, depth + 1, lines)
            lines.append(f"{pad}}}")


# -- swanctl's human output ----------------------------------------------------------------


def _get(tree: TextSection, key: str, default: str = "") -> str:
    """A value, with lists joined by spaces as swanctl shows them."""
    value = tree.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(value)
    return default


def _sections(tree: TextSection) -> list[tuple[str, TextSection]]:
    return [(name, value) for name, value in tree.items() if isinstance(value, dict)]


def _format_child_sa(key: str, c: TextSection) -> list[str]:
    algs = ""
    if "encr-alg" in c:
        algs = _get(c, "encr-alg") + (f"-{_get(c, 'encr-keysize')}" if "encr-keysize" in c else "")
    if "integ-alg" in c:
        algs += ("/" if algs else "") + _get(c, "integ-alg")
        algs += f"-{_get(c, 'integ-keysize')}" if "integ-keysize" in c else ""
    for key_, prefix in (("prf-alg", "/"), ("dh-group", "/")):
        if key_ in c:
            algs += prefix + _get(c, key_)
    if "esn" in c:
        algs += "/ESN"
    encap = "-in-UDP" if "encap" in c else ""
    lines = [f"  {_get(c, 'name', key)}: #{_get(c, 'uniqueid')}, reqid {_get(c, 'reqid')}, "
             f"{_get(c, 'state')}, {_get(c, 'mode')}{encap}, {_get(c, 'protocol')}:{algs}"]
    times = f"    installed {_get(c, 'install-time')}s ago"
    if "rekey-time" in c:
        times += f", rekeying in {_get(c, 'rekey-time')}s"
    if "life-time" in c:
        times += f", expires in {_get(c, 'life-time')}s"
    lines.append(times)
    for direction, label in (("in", "in "), ("out", "out")):
        spi = _get(c, f"spi-{direction}")
        if f"cpi-{direction}" in c:
            spi += "/" + _get(c, f"cpi-{direction}")
        line = (f"    {label} {spi}, {_get(c, f'bytes-{direction}'):>6} bytes, "
                f"{_get(c, f'packets-{direction}'):>5} packets")
        if f"use-{direction}" in c:
            line += f", {_get(c, f'use-{direction}'):>5}s ago"
        lines.append(line)
    lines.append(f"    local  {_get(c, 'local-ts')}")
    lines.append(f"    remote {_get(c, 'remote-ts')}")
    return lines


def _format_ike_sa(name: str, sa: TextSection) -> list[str]:
    initiator = _get(sa, "initiator") == "yes"
    lines = [f"{name}: #{_get(sa, 'uniqueid')}, {_get(sa, 'state')}, IKEv{_get(sa, 'version')}, "
             f"{_get(sa, 'initiator-spi')}_i{'*' if initiator else ''} "
             f"{_get(sa, 'responder-spi')}_r{'' if initiator else '*'}"]
    local = (f"  local  '{_get(sa, 'local-id')}' @ {_get(sa, 'local-host')}"
             f"[{_get(sa, 'local-port')}]")
    if "local-vips" in sa:
        local += f" [{_get(sa, 'local-vips')}]"
    lines.append(local)
    remote = (f"  remote '{_get(sa, 'remote-id')}' @ {_get(sa, 'remote-host')}"
              f"[{_get(sa, 'remote-port')}]")
    if "remote-eap-id" in sa:
        remote += f" EAP: '{_get(sa, 'remote-eap-id')}'"
    if "remote-xauth-id" in sa:
        remote += f" XAuth: '{_get(sa, 'remote-xauth-id')}'"
    if "remote-vips" in sa:
        remote += f" [{_get(sa, 'remote-vips')}]"
    lines.append(remote)
    if "encr-alg" in sa:
        algs = "  " + _get(sa, "encr-alg")
        algs += f"-{_get(sa, 'encr-keysize')}" if "encr-keysize" in sa else ""
        algs += f"/{_get(sa, 'integ-alg')}" if "integ-alg" in sa else ""
        algs += f"-{_get(sa, 'integ-keysize')}" if "integ-keysize" in sa else ""
        lines.append(f"{algs}/{_get(sa, 'prf-alg')}/{_get(sa, 'dh-group')}")
    if "established" in sa:
        line = f"  established {_get(sa, 'established')}s ago"
        for key, text in (("rekey-time", "rekeying in"), ("reauth-time", "reauth in"),
                          ("life-time", "expires in")):
            if key in sa:
                line += f", {text} {_get(sa, key)}s"
        lines.append(line)
    for key, label in (("tasks-queued", "queued: "), ("tasks-active", "active: "),
                       ("tasks-passive", "passive:")):
        if key in sa:
            lines.append(f"  {label} {_get(sa, key)}")
    children = sa.get("child-sas")
    if isinstance(children, dict):
        for key, child in _sections(children):
            lines.extend(_format_child_sa(key, child))
    return lines


def format_sas(events: Sequence[TextSection]) -> list[str]:
    """``swanctl --list-sas`` lines for the list-sa events."""
    lines: list[str] = []
    for event in events:
        for name, sa in _sections(event):
            lines.extend(_format_ike_sa(name, sa))
    return lines


def _rekeying(child: TextSection) -> str:
    mode = _get(child, "mode").upper()
    amounts = [(_get(child, "rekey_time", "0"), "{}s"), (_get(child, "rekey_bytes", "0"),
               "{} bytes"), (_get(child, "rekey_packets", "0"), "{} packets")]
    parts = [fmt.format(v) for v, fmt in amounts if v != "0"]
    if mode in ("PASS", "DROP") or not parts:
        return "no rekeying"
    return "rekeying every " + " or ".join(parts)


def _format_conn(name: str, conn: TextSection) -> list[str]:
    version = _get(conn, "version")
    reauth = _get(conn, "reauth_time", "0")
    rekey = _get(conn, "rekey_time", "0")
    dpd = _get(conn, "dpd_delay", "0")
    if version == "IKEv1" and reauth == "0":
        reauth = rekey
    head = f"{name}: {version}, "
    head += "no reauthentication" if reauth == "0" else f"reauthentication every {reauth}s"
    if version != "IKEv1":
        head += ", no rekeying" if rekey == "0" else f", rekeying every {rekey}s"
    if dpd != "0":
        head += f", dpd delay {dpd}s"
    lines = [head]
    for key, value in conn.items():
        if key in ("local_addrs", "remote_addrs") and isinstance(value, list):
            label = "local: " if key == "local_addrs" else "remote:"
            lines.extend(f"  {label} {addr}" for addr in value)
        elif key == "children" and isinstance(value, dict):
            for child_name, child in _sections(value):
                line = f"  {child_name}: {_get(child, 'mode')}, {_rekeying(child)}"
                if dpd != "0":
                    line += f", dpd action is {_get(child, 'dpd_action')}"
                lines.append(line)
                lines.append(f"    local:  {_get(child, 'local-ts')}")
                lines.append(f"    remote: {_get(child, 'remote-ts')}")
                for extra in ("interface", "priority"):
                    if extra in child:
                        lines.append(f"    {extra}: {_get(child, extra)}")
        elif key.startswith(("local", "remote")) and isinstance(value, dict):
            auth_class = _get(value, "class", "unspecified")
            if auth_class.upper() == "EAP":
                auth_class = _get(value, "eap-type", auth_class)
            side = "local" if key.startswith("local") else "remote"
            lines.append(f"  {side} {auth_class} authentication:")
            for field in ("id", "eap_id", "xauth_id", "aaa_id", "groups", "certs", "cacerts"):
                if field in value:
                    lines.append(f"    {field}: {_get(value, field)}")
    return lines


def format_conns(events: Sequence[TextSection]) -> list[str]:
    """``swanctl --list-conns`` lines for the list-conn events."""
    lines: list[str] = []
    for event in events:
        for name, conn in _sections(event):
            lines.extend(_format_conn(name, conn))
    return lines


def _path(tree: TextSection, dotted: str) -> str:
    node: TextValue = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return node if isinstance(node, str) else " ".join(node) if isinstance(node, list) else ""


_STANDARD_STATS = ("uptime", "workers", "queues", "scheduled", "ikesas", "plugins", "mem",
                   "mallinfo")


def _format_tree(tree: TextSection, depth: int) -> list[str]:
    lines = []
    pad = "  " * depth
    for key, value in tree.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.extend(_format_tree(value, depth + 1))
        else:
            lines.append(f"{pad}{key}: {' '.join(value) if isinstance(value, list) else value}")
    return lines


def format_stats(reply: TextSection) -> list[str]:
    """``swanctl --stats`` lines, then espline's own sections, if any."""
    def p(dotted: str) -> str:
        return _path(reply, dotted)

    prio = ("critical", "high", "medium", "low")
    lines = [
        f"uptime: {p('uptime.running')}, since {p('uptime.since')}",
        f"worker threads: {p('workers.total')} total, {p('workers.idle')} idle, working: "
        + "/".join(p(f"workers.active.{x}") for x in prio),
        "job queues: " + "/".join(p(f"queues.{x}") for x in prio),
        f"jobs scheduled: {p('scheduled')}",
        f"IKE_SAs: {p('ikesas.total')} total, {p('ikesas.half-open')} half-open",
    ]
    if p("mem.total"):
        lines.append(f"memory usage: {p('mem.total')} bytes, {p('mem.allocs')} allocations")
    if p("mallinfo.sbrk"):
        lines.append(f"mallinfo: sbrk {p('mallinfo.sbrk')}, mmap {p('mallinfo.mmap')}, "
                     f"used {p('mallinfo.used')}, free {p('mallinfo.free')}")
    plugins = reply.get("plugins")
    if isinstance(plugins, list):
        lines.append("loaded plugins:" + "".join(f" {name}" for name in plugins))
    extra = {k: v for k, v in reply.items() if k not in _STANDARD_STATS}
    lines.extend(_format_tree(extra, 0))
    return lines


def format_counters(reply: TextSection) -> list[str]:
    """``swanctl --counters`` lines: one block per counter set, ``global`` for the unnamed."""
    lines: list[str] = []
    counters = reply.get("counters")
    if isinstance(counters, dict):
        for name, values in _sections(counters):
            lines.append(f"{name or 'global'}:")
            lines.extend(f"  {key:<22}: {value}" for key, value in values.items()
                         if isinstance(value, str))
    return lines


# -- the commands --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """What one admin command sends: the VICI command, its message, its event stream."""

    command: str
    message: EncodableSection
    event: str | None = None
    timeout: float | None = _REQUEST_TIMEOUT
    label: str | None = None  # the --raw label of the reply, when not "<command> reply"


def _wait_s(seconds: float | None) -> tuple[int | None, float | None]:
    """(VICI timeout in ms, client socket timeout) for ``--timeout`` seconds."""
    if seconds is None or seconds == 0:
        return None, None  # the daemon waits for the result, so do we
    return int(seconds * 1000), seconds + _WAIT_MARGIN


def _selector_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ike", help="IKE_SA (connection) name")
    group.add_argument("--child", help="CHILD_SA name")
    group.add_argument("--ike-id", type=int, help="IKE_SA unique id")
    group.add_argument("--child-id", type=int, help="CHILD_SA reqid")


def _selectors(args: argparse.Namespace) -> dict[str, str | int | None]:
    return {"ike": args.ike, "child": args.child, "ike-id": args.ike_id,
            "child-id": args.child_id}


def _args_list_sas(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ike", help="only the IKE_SAs of this connection")
    p.add_argument("--ike-id", type=int, help="only the IKE_SA with this unique id")


def _call_list_sas(a: argparse.Namespace) -> _Call:
    return _Call("list-sas", {"ike": a.ike, "ike-id": a.ike_id}, "list-sa")


def _args_list_conns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ike", help="only this connection")


def _call_list_conns(a: argparse.Namespace) -> _Call:
    return _Call("list-conns", {"ike": a.ike}, "list-conn")


def _args_initiate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--child", required=True, help="CHILD_SA configuration to initiate")
    p.add_argument("--ike", help="connection to find the CHILD_SA under")
    p.add_argument("--timeout", type=float, help="seconds to wait for the result "
                   "(default: until it is known)")


def _call_initiate(a: argparse.Namespace) -> _Call:
    ms, wait = _wait_s(a.timeout)
    return _Call("initiate", {"child": a.child, "ike": a.ike, "timeout": ms},
                 "control-log", wait)


def _args_terminate(p: argparse.ArgumentParser) -> None:
    _selector_args(p)
    p.add_argument("--force", action="store_true", help="without waiting for the DELETE answer")
    p.add_argument("--timeout", type=float, help="seconds to wait for the result")


def _call_terminate(a: argparse.Namespace) -> _Call:
    ms, wait = _wait_s(a.timeout)
    message = {**_selectors(a), "force": True if a.force else None, "timeout": ms}
    return _Call("terminate", message, "control-log", wait)


def _args_rekey(p: argparse.ArgumentParser) -> None:
    _selector_args(p)
    p.add_argument("--reauth", action="store_true", help="reauthenticate the IKE_SA instead")


def _call_rekey(a: argparse.Namespace) -> _Call:
    message = {**_selectors(a), "reauth": True if a.reauth else None}
    return _Call("rekey", message, "control-log")


def _args_none(p: argparse.ArgumentParser) -> None:
    pass


def _call_stats(a: argparse.Namespace) -> _Call:
    return _Call("stats", {})


def _args_counters(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--name", help="counters of this connection (default: global)")
    group.add_argument("--all", action="store_true", help="counters of every connection")
    p.add_argument("--reset", action="store_true", help="reset the counters instead")


def _call_counters(a: argparse.Namespace) -> _Call:
    command = "reset-counters" if a.reset else "get-counters"
    return _Call(command, {"name": a.name, "all": True if a.all else None},
                 label="counters reply")


def _call_reload(a: argparse.Namespace) -> _Call:
    return _Call("reload-settings", {})


@dataclass(frozen=True)
class _Spec:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    call: Callable[[argparse.Namespace], _Call]


_SPECS: dict[str, _Spec] = {
    "list-sas": _Spec("list the active IKE_SAs and CHILD_SAs", _args_list_sas, _call_list_sas),
    "list-conns": _Spec("list the loaded connections", _args_list_conns, _call_list_conns),
    "initiate": _Spec("initiate a CHILD_SA (and its IKE_SA)", _args_initiate, _call_initiate),
    "terminate": _Spec("terminate an IKE_SA or CHILD_SA", _args_terminate, _call_terminate),
    "rekey": _Spec("rekey an IKE_SA or CHILD_SA", _args_rekey, _call_rekey),
    "stats": _Spec("show daemon statistics", _args_none, _call_stats),
    "counters": _Spec("show or reset IKE event counters", _args_counters, _call_counters),
    "reload": _Spec("reload the daemon's settings", _args_none, _call_reload),
}
ADMIN_COMMANDS = tuple(_SPECS)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--uri", default=None,
                   help=f"admin socket (default: ${ENV_URI} or {DEFAULT_URI})")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the decoded answer as JSON")
    out.add_argument("--raw", action="store_true", help="print swanctl's raw dump")
    out.add_argument("--pretty", action="store_true", help="print swanctl's pretty dump")


def _add(command: str, p: argparse.ArgumentParser) -> None:
    _SPECS[command].add_args(p)
    _add_common(p)
    p.set_defaults(admin_command=command)


def add_admin_parsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Callable[[argparse.Namespace], int | None]:
    """Add the admin subcommands; the returned function runs one (None: not an admin one)."""
    for command, spec in _SPECS.items():
        _add(command, subparsers.add_parser(command, help=spec.help, description=spec.help))

    def dispatch(args: argparse.Namespace) -> int | None:
        command = getattr(args, "admin_command", None)
        return None if command is None else _run(command, args)

    return dispatch


def run_admin(command: str, argv: Sequence[str]) -> int:
    """Run admin ``command`` with its arguments ``argv``; the exit status."""
    if command not in _SPECS:
        print(f"espline: unknown admin command {command!r}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"espline {command}", description=_SPECS[command].help)
    _add(command, parser)
    return _run(command, parser.parse_args(list(argv)))


def _uri(args: argparse.Namespace) -> str:
    return str(args.uri or os.environ.get(ENV_URI) or DEFAULT_URI)


def _text(tree: Section) -> TextSection:
    return to_text(tree, errors="replace")


def _run(command: str, args: argparse.Namespace, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    call = _SPECS[command].call(args)
    human = not (args.json or args.raw or args.pretty)

    def progress(event: Section) -> None:
        # control-log lines as they come, as swanctl shows them
        if call.event == "control-log" and (human or args.json):
            log = _text(event)
            print(f"[{_get(log, 'group', '   ')}] {_get(log, 'msg')}",
                  file=out if human else err, flush=True)

    try:
        with ViciClient(_uri(args), timeout=call.timeout) as client:
            if call.event is None:
                events: list[Section] = []
                reply = client.request(call.command, call.message)
            else:
                events, reply = client.streamed(call.command, call.message, call.event,
                                                on_event=progress)
    except ViciClientError as exc:
        print(f"espline {command}: {exc}", file=err)
        return 1

    failed = "success" in reply and reply["success"] != b"yes"
    if args.raw or args.pretty:
        if call.event is not None:
            for event in events:
                out.write(dump_raw(f"{call.event} event", event, args.pretty))
        out.write(dump_raw(call.label or f"{call.command} reply", reply, args.pretty))
    elif args.json:
        listed = call.event in ("list-sa", "list-conn")
        doc: object = [_text(e) for e in events] if listed else _text(reply)
        json.dump(doc, out, indent=2)
        out.write("\n")
    elif not failed:
        _print_human(command, call, events, reply, out)
    if failed:
        errmsg = _text(reply).get("errmsg", "no reason given")
        print(f"{call.command} failed: {errmsg}", file=err)
        return 1
    return 0


def _print_human(command: str, call: _Call, events: list[Section], reply: Section,
                 out: TextIO) -> None:
    if command == "list-sas":
        lines = format_sas([_text(e) for e in events])
    elif command == "list-conns":
        lines = format_conns([_text(e) for e in events])
    elif command == "stats":
        lines = format_stats(_text(reply))
    elif call.command == "get-counters":
        lines = format_counters(_text(reply))
    else:
        lines = [f"{call.command} completed successfully"]
    for line in lines:
        print(line, file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m controller.admin COMMAND ...``"""
    parser = argparse.ArgumentParser(prog="espline", description="espline admin commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    dispatch = add_admin_parsers(sub)
    rc = dispatch(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))
    assert rc is not None
    return rc


if __name__ == "__main__":
    sys.exit(main())
