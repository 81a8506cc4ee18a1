"""Unit tests of zmgpu.protocol: frame encoding, decoding and body validation."""

import json

import pytest

from zmgpu import protocol
from zmgpu.protocol import (CHUNK_BYTES, MAGIC, REQUIRED, ErrorCode, Message, MsgType, ProtocolError,
                            decode, encode)


def _sample_body(msg_type: MsgType) -> dict:
    """A body holding every required field of ``msg_type`` with a value of an accepted type."""
    samples = {str: "x", int: 1, dict: {}, list: [], bool: True}
    body = {}
    for name, kind in REQUIRED[msg_type].items():
        first = kind[0] if isinstance(kind, tuple) else kind
        body[name] = samples[first]
    return body


def _decode_error(frames) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    return info.value


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda t: t.name)
def test_every_type_round_trips(msg_type):
    body = _sample_body(msg_type)
    payload = [b"\x00\xffraw"] if msg_type in protocol.WITH_PAYLOAD else []
    frames = encode(msg_type, body, *payload)
    assert frames[0] == MAGIC and frames[1] == msg_type.value
    msg = decode(frames)
    assert isinstance(msg, Message)
    assert (msg.type, msg.body, msg.payload) == (msg_type, body, payload)


def test_payload_is_raw_bytes_not_json():
    data = bytes(range(256)) * 4
    frames = encode(MsgType.OUTPUT, {"job_id": "0123abcd", "rank": 0, "stream": "stdout", "offset": 7}, data)
    assert frames[3] is data
    assert data not in frames[2]
    assert decode(frames).payload == [data]


@pytest.mark.parametrize("frames, code", [
    ([], ErrorCode.BAD_FRAME),
    ([MAGIC], ErrorCode.BAD_FRAME),
    ([MAGIC, b"PING"], ErrorCode.BAD_FRAME),
    ([b"ZMGPU0", b"PING", b"{}"], ErrorCode.BAD_FRAME),
    ([b"garbage"], ErrorCode.BAD_FRAME),
    ([MAGIC, b"NOPE", b"{}"], ErrorCode.UNKNOWN_TYPE),
    ([MAGIC, b"ping", b"{}"], ErrorCode.UNKNOWN_TYPE),
    ([MAGIC, b"PING", b"{not json"], ErrorCode.BAD_JSON),
    ([MAGIC, b"PING", b"\xff\xfe"], ErrorCode.BAD_JSON),
    ([MAGIC, b"PING", b"[1, 2]"], ErrorCode.BAD_JSON),
    ([MAGIC, b"PING", b"null"], ErrorCode.BAD_JSON),
    ([MAGIC, b"PING", b"{}"], ErrorCode.BAD_REQUEST),
    ([MAGIC, b"PING", b'{"user": "u"}'], ErrorCode.BAD_REQUEST),
    ([MAGIC, b"PING", b'{"user": 5, "req": 1}'], ErrorCode.BAD_REQUEST),
    ([MAGIC, b"PING", b'{"user": "u", "req": "1"}'], ErrorCode.BAD_REQUEST),
    ([MAGIC, b"PING", b'{"user": "u", "req": true}'], ErrorCode.BAD_REQUEST),
    ([MAGIC, b"FETCH", b'{"user": "u", "req": 1, "job_id": "a", "rank": 0, "stream": "stdout"}'],
     ErrorCode.BAD_REQUEST),
    ([MAGIC, b"OUTPUT", b'{"job_id": "a", "rank": 0, "stream": "stdout", "offset": 0}'], ErrorCode.BAD_FRAME),
    ([MAGIC, b"OUTPUT", b'{"job_id": "a", "rank": 0, "stream": "stdout", "offset": 0}', b"a", b"b"],
     ErrorCode.BAD_FRAME),
], ids=lambda v: v.name if isinstance(v, ErrorCode) else None)
def test_bad_messages_raise_typed_errors(frames, code):
    err = _decode_error(frames)
    assert err.code is code
    assert err.message and "\n" not in err.message


def test_missing_field_error_names_the_field():
    err = _decode_error(encode(MsgType.JOB, {"user": "u", "req": 1}))
    assert "job_id" in err.message


def test_wrong_type_error_names_the_field():
    err = _decode_error(encode(MsgType.CANCEL, {"user": "u", "req": 1, "job_ids": "abc"}))
    assert "job_ids" in err.message


def test_unknown_type_message_is_bounded():
    err = _decode_error([MAGIC, b"X" * 100_000, b"{}"])
    assert err.code is ErrorCode.UNKNOWN_TYPE
    assert len(err.message) < 200


def test_optional_fields_accept_none_and_ints():
    body = {"job_id": "a", "rank": 0, "exit_code": None, "signal": 9, "reason": None, "sizes": {}}
    assert decode(encode(MsgType.JOB_ENDED, body)).body == body
    body.update(exit_code=0, signal=None, reason="killed")
    assert decode(encode(MsgType.JOB_ENDED, body)).body == body
    body["exit_code"] = "0"
    assert _decode_error(encode(MsgType.JOB_ENDED, body)).code is ErrorCode.BAD_REQUEST


def test_numeric_fields_accept_int_and_float_but_not_bool():
    for value in (1, 0.25):
        body = decode(encode(MsgType.REGISTERED, {"heartbeat_interval": value})).body
        assert body["heartbeat_interval"] == value
    err = _decode_error(encode(MsgType.REGISTERED, {"heartbeat_interval": True}))
    assert err.code is ErrorCode.BAD_REQUEST


def test_extra_fields_are_kept():
    body = {"user": "u", "req": 1, "all": True, "extra": [1]}
    assert decode(encode(MsgType.QUEUE, body)).body == body


def test_every_type_has_a_required_table_and_a_distinct_value():
    assert set(REQUIRED) == set(MsgType)
    assert len({t.value for t in MsgType}) == len(MsgType)
    assert all(t.value == t.name.encode() for t in MsgType)


def test_replies():
    assert protocol.ok_reply(4, job_id="0123abcd") == {"ok": True, "req": 4, "job_id": "0123abcd"}
    err = protocol.error_reply(5, ErrorCode.UNKNOWN_JOB, "unknown job id 'x'")
    assert err == {"ok": False, "req": 5, "error": "UNKNOWN_JOB", "message": "unknown job id 'x'"}
    json.dumps(err)  # the code is a str Enum: it must serialise as its value
    assert json.loads(encode(MsgType.REPLY, err)[2])["error"] == "UNKNOWN_JOB"


def test_topics():
    assert protocol.job_topic("0123abcd", "output") == b"job.0123abcd.output"
    assert protocol.job_topic("0123abcd", "state") == b"job.0123abcd.state"
    assert protocol.job_topic("0123abcd", "state").startswith(protocol.job_prefix("0123abcd"))
    # a prefix must not match a job whose id merely starts with the same characters
    assert not b"job.0123abcde.state".startswith(protocol.job_prefix("0123abcd"))
    assert protocol.node_topic("n1") == b"node.n1.state"


def test_chunk_size_is_sane():
    assert 4096 <= CHUNK_BYTES <= 16 * 1024 * 1024
