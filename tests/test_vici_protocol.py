"""VICI wire format (controller/vici/protocol.py) and the command adapter, without sockets.

Known encodings are worked out by hand from the vici plugin's README (strongSwan
src/libcharon/plugins/vici/README.md); the README's own "Encoding example" is used verbatim.
The fuzz invariant: arbitrary bytes either decode or raise ViciProtocolError, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.vici.commands import (
    ChildSaInfo,
    Commands,
    IkeSaInfo,
    StatsInfo,
    VersionInfo,
    child_updown_event,
    ike_sa_tree,
    ike_updown_event,
)
from controller.vici.protocol import (
    MAX_SECTION_DEPTH,
    MAX_SEGMENT_SIZE,
    FrameDecoder,
    Packet,
    PacketType,
    ViciProtocolError,
    decode_message,
    decode_packet,
    encode_message,
    encode_packet,
    to_text,
)

# README §Encoding example, the C array transcribed byte for byte.
README_EXAMPLE = bytes(
    [3, 4, *b"key1", 0, 6, *b"value1",
     1, 8, *b"section1",
     1, 11, *b"sub-section",
     3, 4, *b"key2", 0, 6, *b"value2",
     2,
     4, 5, *b"list1",
     5, 0, 5, *b"item1",
     5, 0, 5, *b"item2",
     6,
     2]
)
README_TREE = {
    "key1": b"value1",
    "section1": {"sub-section": {"key2": b"value2"}, "list1": [b"item1", b"item2"]},
}


def test_readme_example_decodes() -> None:
    assert decode_message(README_EXAMPLE) == README_TREE


def test_readme_example_encodes_byte_exact() -> None:
    assert encode_message(README_TREE) == README_EXAMPLE
    # str values encode the same as their bytes
    as_text = {"key1": "value1",
               "section1": {"sub-section": {"key2": "value2"}, "list1": ["item1", "item2"]}}
    assert encode_message(as_text) == README_EXAMPLE


def test_packet_encodings_byte_exact() -> None:
    # README §Transport protocol: 32-bit length of the data, then §Packet layer: type, and for
    # named types an 8-bit name length and the name.
    assert encode_packet(PacketType.CMD_REQUEST, "version") == b"\x00\x00\x00\x09\x00\x07version"
    assert encode_packet(PacketType.EVENT_CONFIRM) == b"\x00\x00\x00\x01\x05"
    assert encode_packet(PacketType.EVENT_REGISTER, "list-sa") == (
        b"\x00\x00\x00\x09\x03\x07list-sa")
    response = encode_packet(PacketType.CMD_RESPONSE, message={"success": "yes"})
    assert response == b"\x00\x00\x00\x0f\x01" + b"\x03\x07success\x00\x03yes"
    event = encode_packet(PacketType.EVENT, "log", {"msg": "hi"})
    assert event == b"\x00\x00\x00\x0e\x07\x03log" + b"\x03\x03msg\x00\x02hi"


def test_scalars_encode_like_strongswan() -> None:
    tree = {"n": 42, "yes": True, "no": False, "s": "x", "b": b"\x00\xff", "skip": None,
            "l": [1, True, "a", b"b"]}
    assert decode_message(encode_message(tree)) == {
        "n": b"42", "yes": b"yes", "no": b"no", "s": b"x", "b": b"\x00\xff",
        "l": [b"1", b"yes", b"a", b"b"]}
    # bytes-like values are values, not sequences of ints
    assert encode_message({"b": bytearray(b"ab")}) == encode_message({"b": b"ab"})


def test_empty_names_and_lists_round_trip() -> None:
    # get-counters answers the global set under an empty section name
    tree = {"counters": {"": {"invalid": b"0"}}, "empty": [], "sec": {}}
    assert decode_message(encode_message(tree)) == tree


def test_to_text() -> None:
    assert to_text(README_TREE) == {
        "key1": "value1",
        "section1": {"sub-section": {"key2": "value2"}, "list1": ["item1", "item2"]}}
    with pytest.raises(ViciProtocolError, match="not UTF-8"):
        to_text({"k": b"\xff"})
    assert to_text({"k": b"\xff"}, errors="replace") == {"k": "\ufffd"}


# -- malformed input -----------------------------------------------------------------------


def test_every_truncation_of_the_example_is_rejected_or_a_valid_prefix() -> None:
    # Only two prefixes are whole messages: empty, and "key1 = value1" alone (14 bytes).
    for n in range(len(README_EXAMPLE)):
        if n in (0, 14):
            decode_message(README_EXAMPLE[:n])
            continue
        with pytest.raises(ViciProtocolError):
            decode_message(README_EXAMPLE[:n])


@pytest.mark.parametrize(("data", "reason"), [
    (README_EXAMPLE + b"\x02", "SECTION_END without a section"),
    (README_EXAMPLE + b"\x07", "unknown element type 7"),
    (README_EXAMPLE + b"\x00", "unknown element type 0"),
    (README_EXAMPLE + b"\x05\x00\x01a", "LIST_ITEM outside a list"),
    (README_EXAMPLE + b"\x06", "LIST_END outside a list"),
    (b"\x03\x01k\x00\x01v\x03\x01k\x00\x01w", "duplicate key 'k'"),
    (b"\x04\x01l\x05\x00\x01a", "ends inside a list"),
    (b"\x04\x01l\x03\x01k\x00\x01v\x06", "KEY_VALUE inside a list"),
    (b"\x04\x01l\x04\x01m\x06\x06", "LIST_START inside a list"),
    (b"\x04\x01l\x01\x01s\x02\x06", "SECTION_START inside a list"),
    (b"\x01\x01s", "1 section\\(s\\) open"),
    (b"\x03\x02\xff\xfe\x00\x00", "not ASCII/UTF-8"),
    (b"\x03\x01k\x00\x05abc", "truncated"),
])
def test_malformed_messages(data: bytes, reason: str) -> None:
    with pytest.raises(ViciProtocolError, match=reason):
        decode_message(data)


def test_section_depth_is_limited() -> None:
    deep = b"\x01\x01s" * (MAX_SECTION_DEPTH + 1) + b"\x02" * (MAX_SECTION_DEPTH + 1)
    with pytest.raises(ViciProtocolError, match="nested deeper"):
        decode_message(deep)
    ok = b"\x01\x01s" * MAX_SECTION_DEPTH + b"\x02" * MAX_SECTION_DEPTH
    decode_message(ok)


@pytest.mark.parametrize(("segment", "reason"), [
    (b"\x08", "unknown packet type 8"),
    (b"\x00", "truncated packet"),
    (b"\x00\x05ab", "truncated packet"),
    (b"\x05\x00", "EVENT_CONFIRM with 1 trailing bytes"),
    (b"\x03\x02ev\x03", "EVENT_REGISTER with 1 trailing bytes"),
    (b"\x01\x02", "SECTION_END without a section"),
])
def test_malformed_packets(segment: bytes, reason: str) -> None:
    with pytest.raises(ViciProtocolError, match=reason):
        decode_packet(segment)


def test_frame_decoder_limits() -> None:
    with pytest.raises(ViciProtocolError, match="max 524288"):
        # refused on the header alone, before the data arrives
        FrameDecoder().feed((MAX_SEGMENT_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(ViciProtocolError, match="empty segment"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")
    big = {"v": [b"x" * 60000] * 8}  # 480 KB: under the limit
    assert FrameDecoder().feed(encode_packet(PacketType.EVENT, "e", big))[0].message == big
    with pytest.raises(ValueError, match="max 524288"):
        encode_packet(PacketType.EVENT, "e", {"v": [b"x" * 60000] * 9})


def test_frame_decoder_byte_by_byte_and_batched() -> None:
    stream = (encode_packet(PacketType.CMD_REQUEST, "load-conn", README_TREE)
              + encode_packet(PacketType.EVENT_REGISTER, "list-sa")
              + encode_packet(PacketType.CMD_UNKNOWN))
    expected = [Packet(PacketType.CMD_REQUEST, "load-conn", README_TREE),
                Packet(PacketType.EVENT_REGISTER, "list-sa"),
                Packet(PacketType.CMD_UNKNOWN)]
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i:i + 1])
    assert got == expected and decoder.pending == 0
    assert FrameDecoder().feed(stream) == expected


def test_encoding_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="max 255"):
        encode_message({"k" * 256: "v"})
    with pytest.raises(ValueError, match="max 65535"):
        encode_message({"k": b"v" * 65536})
    with pytest.raises(ValueError, match="holds a dict"):
        encode_message({"l": [{"nested": "no"}]})
    with pytest.raises(ValueError, match="needs a name"):
        encode_packet(PacketType.CMD_REQUEST)
    with pytest.raises(ValueError, match="carries no message"):
        encode_packet(PacketType.EVENT_CONFIRM, message={"k": "v"})


# -- properties ----------------------------------------------------------------------------

_names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
_values = st.binary(max_size=40)
_trees = st.recursive(
    st.dictionaries(_names, st.one_of(_values, st.lists(_values, max_size=4)), max_size=4),
    lambda children: st.dictionaries(
        _names, st.one_of(_values, st.lists(_values, max_size=4), children), max_size=4),
    max_leaves=24,
)


@settings(max_examples=150, deadline=None)
@given(_trees)
def test_round_trip(tree: dict) -> None:  # type: ignore[type-arg]
    assert decode_message(encode_message(tree)) == tree


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(PacketType)), _names, _trees), max_size=5),
       st.randoms(use_true_random=False))
def test_packet_stream_round_trip(packets: list, rnd: random.Random) -> None:  # type: ignore[type-arg]
    named = {PacketType.CMD_REQUEST, PacketType.EVENT_REGISTER, PacketType.EVENT_UNREGISTER,
             PacketType.EVENT}
    with_message = {PacketType.CMD_REQUEST, PacketType.CMD_RESPONSE, PacketType.EVENT}
    expected = [Packet(t, n if t in named else None, m if t in with_message else {})
                for t, n, m in packets]
    stream = b"".join(encode_packet(p.type, p.name, p.message) for p in expected)
    decoder = FrameDecoder()
    got: list[Packet] = []
    pos = 0
    while pos < len(stream):
        step = rnd.randint(1, 64)
        got += decoder.feed(stream[pos:pos + step])
        pos += step
    assert got == expected


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_messages_decode_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ViciProtocolError):
        decode_message(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_frames_decode_or_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ViciProtocolError):
        FrameDecoder().feed(data)


# -- the command adapter, sans-IO ----------------------------------------------------------

CHILD = ChildSaInfo(
    name="lan", uniqueid=3, reqid=1, state="INSTALLED", mode="TUNNEL", protocol="ESP",
    encap=False, spi_in=0xC0FFEE01, spi_out=0x00000042, encr_alg="AES_GCM_16",
    encr_keysize=128, integ_alg=None, esn=True, bytes_in=1, bytes_out=2, packets_in=3,
    packets_out=4, use_in=None, use_out=7, rekey_time=None, life_time=99, install_time=5,
    local_ts=("10.1.0.0/16",), remote_ts=("10.2.0.0/16", "10.3.0.0/16"))
SA = IkeSaInfo(
    name="site-b", uniqueid=1, version=2, state="ESTABLISHED", local_host="192.0.2.1",
    local_port=500, local_id="moon", remote_host="192.0.2.2", remote_port=500,
    remote_id="sun", initiator=False, initiator_spi=bytes(range(8)),
    responder_spi=bytes(range(8, 16)), nat_local=False, nat_remote=False, encr_alg="AES_CBC",
    encr_keysize=256, integ_alg="HMAC_SHA2_256_128", prf_alg="PRF_HMAC_SHA2_256",
    dh_group="CURVE_25519", established=10, rekey_time=None, child_sas=(CHILD,))


def test_list_sa_tree_has_strongswans_keys_in_order() -> None:
    tree = ike_sa_tree(SA)
    assert list(tree)[-1] == "child-sas"  # swanctl prints the IKE_SA on reaching it
    assert tree["initiator"] is None and tree["nat-local"] is None  # only present when true
    assert tree["initiator-spi"] == "0001020304050607"
    decoded = to_text(decode_message(encode_message({"site-b": tree})))["site-b"]
    assert isinstance(decoded, dict)
    child = decoded["child-sas"]["lan-3"]  # type: ignore[index]
    assert child["spi-in"] == "c0ffee01" and child["spi-out"] == "00000042"
    assert child["esn"] == "1" and "encap" not in child and "use-in" not in child
    assert child["remote-ts"] == ["10.2.0.0/16", "10.3.0.0/16"]
    assert "rekey-time" not in decoded


def test_updown_events() -> None:
    up = decode_message(encode_message(ike_updown_event(SA, up=True)))
    assert up["up"] == b"yes" and "child-sas" not in up["site-b"]  # type: ignore[operator]
    down = decode_message(encode_message(child_updown_event(SA, CHILD, up=False)))
    assert "up" not in down
    assert list(down["site-b"]["child-sas"]) == ["lan-3"]  # type: ignore[call-overload,index]


class _MiniBackend:
    """Only what these adapter tests call; the full fake lives in test_vici_swanctl.py."""

    def __init__(self) -> None:
        self.shared: list[tuple[str, bytes, list[str], str | None]] = []

    def version(self) -> VersionInfo:
        return VersionInfo("espline", "9.9")

    def stats(self) -> StatsInfo:
        return StatsInfo(started_at=1000.0, ike_sas_total=2, ike_sas_half_open=1,
                         extra={"dataplane": {"workers": 4}})

    def load_shared(self, type: str, data: bytes, owners: list[str], id: str | None) -> None:
        self.shared.append((type, data, owners, id))
        raise ValueError(f"cannot use {data.decode()!r} for {owners}")


def _run(commands: Commands, name: str, request: dict) -> tuple[dict, list]:  # type: ignore[type-arg]
    events: list = []  # type: ignore[type-arg]
    response = asyncio.run(commands.handle(
        name, decode_message(encode_message(request)), lambda e, m: events.append((e, m))))
    return response, events  # type: ignore[return-value]


def test_commands_version_stats_unknown() -> None:
    commands = Commands(_MiniBackend(), now=lambda: 1000.0 + 3 * 3600)  # type: ignore[arg-type]
    version, _ = _run(commands, "version", {})
    assert version["daemon"] == "espline" and version["version"] == "9.9"
    assert version["sysname"]  # filled from os.uname()
    stats, _ = _run(commands, "stats", {})
    assert stats["uptime"]["running"] == "3 hours"
    assert stats["ikesas"] == {"total": 2, "half-open": 1}
    assert stats["dataplane"] == {"workers": 4}
    assert _run(commands, "no-such-command", {})[0] is None


def test_commands_errors_become_errmsg_and_secrets_are_redacted() -> None:
    backend = _MiniBackend()
    commands = Commands(backend)  # type: ignore[arg-type]
    response, _ = _run(commands, "load-shared",
                       {"type": "ike", "data": "hunter2", "owners": ["moon"]})
    assert backend.shared == [("IKE", b"hunter2", ["moon"], None)]
    assert response["success"] == "no"
    assert "hunter2" not in response["errmsg"] and "<secret>" in response["errmsg"]
    # a backend without the method: an internal error, answered all the same
    response, _ = _run(commands, "list-sas", {})
    assert response["success"] == "no" and "internal error" in response["errmsg"]
    response, _ = _run(commands, "initiate", {})
    assert response == {"success": "no", "errmsg": "missing configuration name"}
    response, _ = _run(commands, "terminate", {"timeout": "-1"})
    assert response == {"success": "no", "errmsg": "missing terminate selector"}
    response, _ = _run(commands, "rekey", {"ike-id": "one"})
    assert response["success"] == "no" and "must be a number" in response["errmsg"]
