"""Publish acks of whole batches through one reply subscription."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg


@dataclass(slots=True)
class _AckBatch:
    id: int
    prefix: str
    expected: int
    done: asyncio.Future[None]
    stored: bytes  # what an ack of the stream the batch goes to holds: '"stream":"<name>"'
    errors: list[bytes] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)

    def reply(self, index: int) -> str:
        return f"{self.prefix}.{self.id}.{index}"


class AckCollector:
    """JetStream publish acks for whole batches through one reply subscription.

    nats-py's `publish_async` costs a task, a semaphore, a future and a random token per
    message; here a batch is one future and an ack is a counter tick (about twice as fast
    per event, bench/RESULTS.md). An ack counts as stored when it names the batch's stream;
    anything else (an error, a 503 "no responders") is collected as a refusal."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = f"{nc.new_inbox()}.ack"
        self._ids = itertools.count(1)
        self._waiting: dict[int, _AckBatch] = {}

    async def start(self) -> None:
        await self.nc.subscribe(f"{self.prefix}.>", cb=self._on_ack, pending_msgs_limit=1_000_000)

    def expect(self, count: int, stream: str) -> _AckBatch:
        batch = _AckBatch(
            next(self._ids), self.prefix, count, asyncio.get_running_loop().create_future(),
            f'"stream":"{stream}"'.encode(),
        )  # fmt: skip
        self._waiting[batch.id] = batch
        return batch

    def forget(self, batch: _AckBatch) -> None:
        self._waiting.pop(batch.id, None)

    async def _on_ack(self, msg: Msg) -> None:
        batch_id, _, index = msg.subject[len(self.prefix) + 1 :].partition(".")
        batch = self._waiting.get(int(batch_id))
        if batch is None or int(index) in batch.seen:
            return  # a late ack of a batch given up on, or a repeat
        batch.seen.add(int(index))
        if batch.stored not in msg.data or b'"error"' in msg.data:
            batch.errors.append(bytes(msg.data) or f"status {(msg.headers or {}).get('Status')}".encode())
        if len(batch.seen) == batch.expected and not batch.done.done():
            batch.done.set_result(None)
