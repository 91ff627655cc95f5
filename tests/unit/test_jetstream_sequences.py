"""Sequences read off a JetStream reply subject agree with nats-py's own metadata."""

from __future__ import annotations

from nats.aio.msg import Msg

from engine.adapters.nats_consumers import jetstream_position, jetstream_sequences


def delivery(reply: str) -> Msg:
    return Msg(_client=None, subject="signals.s.BTCUSDT", reply=reply, data=b"{}")  # type: ignore[arg-type]


def test_the_plain_reply_form_is_read_directly() -> None:
    msg = delivery("$JS.ACK.SIGNALS.tradeengine-worker.2.41.17.1764075600000000000.3")
    assert jetstream_sequences(msg) == (41, 17)
    assert (msg.metadata.sequence.stream, msg.metadata.sequence.consumer) == (41, 17)


def test_the_domain_form_goes_through_nats_py() -> None:
    msg = delivery("$JS.ACK.hub.ACCHASH.SIGNALS.tradeengine-worker.2.41.17.1764075600000000000.3.r4nd0m")
    assert jetstream_sequences(msg) == (41, 17)


def test_the_position_and_what_is_pending_after_it() -> None:
    msg = delivery("$JS.ACK.EVENTS.replay-1.1.41.17.1764075600000000000.3")
    assert jetstream_position(msg) == (41, 3) == (msg.metadata.sequence.stream, msg.metadata.num_pending)
    odd = delivery("$JS.ACK.hub.ACCHASH.EVENTS.replay-1.1.41.17.1764075600000000000.0.r4nd0m")
    assert jetstream_position(odd) == (41, 0)
