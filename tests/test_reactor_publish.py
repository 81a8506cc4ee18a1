"""The master's events go out at the end of a reactor turn, in order, or at once at the high-water mark;
it builds them only for topics someone subscribed to, however many subscriptions there are.

In-process: the master's Reactor on loopback and a real SUB socket.
"""

import logging

import pytest
import zmq

from conftest import poll
from zmgpu import protocol
from zmgpu.client import Client
from zmgpu.master.reactor import PUB_HWM, Reactor
from zmgpu.protocol import MsgType, decode, encode


def wait_wants(reactor: Reactor, topic: bytes, wanted: bool) -> None:
    """Take (un)subscriptions as the reactor's loop would, until it wants ``topic`` or not, as asked."""
    def settled():
        if reactor.pub.poll(20):
            reactor._read_subscriptions()
        return reactor.wants(topic) == wanted
    poll(settled, 10, f"the master to {'take' if wanted else 'drop'} the subscription {topic!r}")


@pytest.fixture
def wired():
    reactor = Reactor("127.0.0.1", 0, 0, logging.getLogger("test.reactor"))
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"t.")
    sub.connect(f"tcp://127.0.0.1:{reactor.pub_port}")

    try:
        wait_wants(reactor, b"t.x", True)
        yield reactor, sub
    finally:
        sub.close(0)
        ctx.term()
        reactor.close()


def received(sub, count: int) -> list[int]:
    got = []
    while len(got) < count and sub.poll(5000):
        frames = sub.recv_multipart()
        got.append(decode(frames[1:]).body["n"])
    return got


def event(n: int) -> dict:
    return {"job_id": f"{n:08x}", "state": "PENDING", "n": n}


def test_events_wait_for_the_end_of_the_turn_and_keep_their_order(wired):
    reactor, sub = wired
    for n in range(3):
        reactor.publish(b"t.x", MsgType.JOB_STATE, lambda n=n: event(n))
    assert len(reactor.unpublished) == 3
    # A marker sent straight on the socket now: the subscriber sees it first only if none of the three
    # went out before the end of the turn (one connection keeps the order).
    reactor.pub.send_multipart([b"t.x", *encode(MsgType.JOB_STATE, event(-1))])
    reactor.send_published()
    assert received(sub, 4) == [-1, 0, 1, 2]


def test_a_burst_goes_out_at_the_high_water_mark_without_waiting_for_the_turn(wired):
    reactor, sub = wired
    for n in range(PUB_HWM):
        reactor.publish(b"t.x", MsgType.JOB_STATE, lambda n=n: event(n))
    assert not reactor.unpublished
    assert received(sub, PUB_HWM) == list(range(PUB_HWM))


def test_wants_follows_thousands_of_subscriptions_of_several_lengths(wired):
    """A client waiting on each task of big arrays: every subscription reaches the master (past ZeroMQ's
    send high-water mark of 1,000), and each is told apart from the others, whatever their lengths."""
    reactor, _ = wired
    tasks = [f"{i:08x}" for i in range(1000)] + [f"{i:08x}_{t}" for i in range(2) for t in range(1000)]
    topics = [protocol.end_topic(task) for task in tasks]
    client = Client("127.0.0.1", port=1, pub_port=reactor.pub_port, default_keys=False)
    sub = client._subscriber(*topics)

    try:
        wait_wants(reactor, topics[-1], True)   # one socket's subscriptions arrive in order
        assert all(reactor.wants(topic) for topic in topics)
        assert reactor.wants(b"t.the fixture's prefix")
        assert not any(reactor.wants(topic) for topic in (
            protocol.end_topic("00000fff"), protocol.end_topic("00000001_1000"), b"ended.00000001",
            protocol.job_topic("00000001", "state"), b"t", b""))
        dropped, kept = topics[::2], topics[1::2]
        for topic in dropped:
            sub.setsockopt(zmq.UNSUBSCRIBE, topic)
        wait_wants(reactor, dropped[-1], False)
        assert not any(reactor.wants(topic) for topic in dropped)
        assert all(reactor.wants(topic) for topic in kept)
        sub.setsockopt(zmq.SUBSCRIBE, b"")   # everything
        wait_wants(reactor, b"anything at all", True)
        assert reactor.wants(b"") and all(reactor.wants(topic) for topic in dropped)
    finally:
        sub.close(0)
        client.close()
