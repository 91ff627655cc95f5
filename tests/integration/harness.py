"""Runs the real worker and attribution consumer against real servers and watches EVENTS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js.api import DeliverPolicy

from engine.adapters.gateway import ExchangeGateway
from engine.adapters.mysql_store import MysqlStore
from engine.adapters.nats_bus import EVENTS_STREAM, NatsBus
from engine.adapters.paper import PaperExchange
from engine.app.attribution import AttributionConsumers
from engine.app.runner import build_gateway
from engine.app.worker import Worker
from engine.config import MysqlTarget, Settings, load_settings
from engine.domain.events import (
    Event,
    PositionClosed,
    PositionOpened,
    SignalDead,
    SignalDecided,
    decode_event,
)
from engine.emulator.binanceusdm import Exchange

T = TypeVar("T")


async def eventually(probe: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy, with a deadline (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def eventually_async(
    probe: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


async def eventually_quiet(probe: Callable[[], bool], timeout: float) -> bool:
    """Like `eventually`, but a timeout is an answer, not a failure."""
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class Pipeline:
    def __init__(
        self,
        nats_url: str,
        mysql_url: str,
        emulator: Exchange | None = None,
        start_worker: bool = True,
        **overrides: Any,
    ) -> None:
        """With `emulator` (an in-process Binance USD-M emulator's state), set EXCHANGE and
        EXCHANGE_API_URL to trade on it through ccxt; ticks then move its price too. Without
        `start_worker`, the test runs its own workers."""
        self.emulator = emulator
        self.with_worker = start_worker
        self.gateway: ExchangeGateway | None = None
        self.settings: Settings = load_settings(
            nats_url=nats_url,
            mysql_url=mysql_url,
            http_port=None,
            **{k.lower(): v for k, v in overrides.items()},
        )
        self.events: list[Event] = []
        self.client: Client | None = None
        self.worker: Worker | None = None
        self.worker_bus: NatsBus | None = None
        self.worker_task: asyncio.Task[None] | None = None
        self.attribution: AttributionConsumers | None = None
        self.attribution_task: asyncio.Task[None] | None = None
        self.store: MysqlStore | None = None
        self.attribution_bus: NatsBus | None = None

    async def __aenter__(self) -> Pipeline:
        assert self.settings.nats_url
        self.client = await nats.connect(self.settings.nats_url.split(","))
        bootstrap = NatsBus(self.client)
        bootstrap.replicas = self.settings.stream_replicas
        bootstrap.partitions = self.settings.signal_partitions
        await bootstrap.ensure_streams()
        # One ordered consumer over the whole stream: events arrive in stream order, so a test
        # that has seen a decision has seen the positions stored before it.
        await self.client.jetstream().subscribe(
            "",
            stream=EVENTS_STREAM,
            cb=self._collect,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        if self.with_worker:
            await self.start_worker()
        await self.start_attribution()
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType] | None) -> None:
        await self.stop_worker()
        await self.stop_attribution()
        if self.client is not None:
            await self.client.close()

    async def _collect(self, msg: Any) -> None:
        self.events.append(decode_event(msg.data))

    # --- roles ---------------------------------------------------------------------------
    async def start_worker(self) -> Worker:
        assert self.settings.nats_url
        self.worker_bus = await NatsBus.connect(self.settings.nats_url, "test-worker")
        self.worker_bus.signer = self.settings.event_signer()
        self.worker_bus.replicas = self.settings.stream_replicas
        self.gateway = gateway = build_gateway(self.settings)
        self.worker = Worker(self.settings, self.worker_bus, gateway)
        self.worker_task = asyncio.create_task(self.worker.run())
        await self._until_ready(self.worker.ready, self.worker_task)
        return self.worker

    async def stop_worker(self) -> None:
        if self.worker and self.worker_task:
            self.worker.stop()
            await asyncio.wait_for(self.worker_task, 10)
        if self.gateway:
            await self.gateway.close()
        if self.worker_bus:
            await self.worker_bus.close()
        self.worker = self.worker_task = self.worker_bus = None
        self.gateway = None

    async def start_attribution(self) -> None:
        assert self.settings.nats_url and self.settings.mysql_url
        self.attribution_bus = await NatsBus.connect(self.settings.nats_url, "test-attribution")
        self.attribution_bus.signer = self.settings.event_signer()
        self.attribution_bus.replicas = self.settings.stream_replicas
        self.store = await MysqlStore.open(
            MysqlTarget.parse(self.settings.mysql_url),
            connect_timeout=self.settings.mysql_connect_timeout,
            read_timeout=self.settings.mysql_read_timeout,
            connections=max(4, self.settings.attribution_partitions + 2),
        )
        self.attribution = AttributionConsumers(self.settings, self.attribution_bus, self.store)
        self.attribution_task = asyncio.create_task(self.attribution.run())
        await self._until_ready(self.attribution.ready, self.attribution_task)

    async def stop_attribution(self) -> None:
        if self.attribution and self.attribution_task:
            self.attribution.stop()
            await asyncio.wait_for(self.attribution_task, 10)
        if self.attribution_bus:
            await self.attribution_bus.close()
        if self.store:
            await self.store.close()
        self.attribution = self.attribution_task = self.attribution_bus = self.store = None

    @staticmethod
    async def _until_ready(ready: asyncio.Event, task: asyncio.Task[None]) -> None:
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises what the role died of
        assert waiter in done, "role did not become ready"

    # --- inputs --------------------------------------------------------------------------
    async def publish(self, strategy_id: str, symbol: str, action: str, **fields: Any) -> str:
        payload = {"strategy_id": strategy_id, "symbol": symbol, "action": action, **fields}
        signal_id = str(
            fields.get("signal_id") or f"{strategy_id}-{action}-{len(self.events)}-{time.monotonic_ns()}"
        )
        payload["signal_id"] = signal_id
        await self.publish_raw(
            f"signals.{strategy_id}.{symbol}", json.dumps(payload, default=str).encode(), signal_id
        )
        return signal_id

    async def publish_raw(self, subject: str, data: bytes, msg_id: str | None = None) -> bool:
        assert self.client is not None
        ack = await self.client.jetstream().publish(
            subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None
        )
        return not ack.duplicate

    async def tick(self, symbol: str, price: str, timeout: float = 10.0) -> None:
        """Publish a tick until the worker has seen it: ticks are plain NATS messages, and one
        sent while a subscriber is reconnecting is gone (the next tick repairs that in real life)."""
        assert self.client is not None and self.worker is not None
        if self.emulator is not None:
            self.emulator.set_price(symbol, Decimal(price))
        worker, body = self.worker, json.dumps({"symbol": symbol, "price": price}).encode()
        deadline = time.monotonic() + timeout
        while worker.last_prices.get(symbol) != Decimal(price):
            assert time.monotonic() < deadline, f"tick {symbol} {price} never reached the worker"
            await self.client.publish(f"prices.{symbol}", body)
            await eventually_quiet(lambda: worker.last_prices.get(symbol) == Decimal(price), 0.5)

    # --- observations --------------------------------------------------------------------
    def venue_order_count(self) -> int:
        """Orders the venue executed: the emulator's own record, or the paper venue's."""
        if self.emulator is not None:
            return len(self.emulator.orders)
        assert isinstance(self.gateway, PaperExchange)
        return len(self.gateway.orders)

    async def decision(self, signal_id: str, timeout: float = 10.0) -> SignalDecided:
        def find() -> SignalDecided | None:
            return next((e for e in self.decisions() if e.signal_id == signal_id), None)

        return await eventually(find, timeout, what=f"decision for {signal_id}")

    def decisions(self) -> list[SignalDecided]:
        return [e for e in self.events if isinstance(e, SignalDecided)]

    def opened(self) -> list[PositionOpened]:
        return [e for e in self.events if isinstance(e, PositionOpened)]

    def closed(self) -> list[PositionClosed]:
        return [e for e in self.events if isinstance(e, PositionClosed)]

    def dead(self) -> list[SignalDead]:
        return [e for e in self.events if isinstance(e, SignalDead)]

    async def wait_events(self, predicate: Callable[[list[Event]], bool], what: str = "events") -> None:
        await eventually(lambda: predicate(self.events), what=what)

    async def stored_event_count(self) -> int:
        assert self.client is not None
        info = await self.client.jetstream().stream_info("EVENTS")
        return int(info.state.messages)

    async def mysql_caught_up(self, timeout: float = 15.0) -> None:
        expected = await self.stored_event_count()
        deadline = time.monotonic() + timeout
        while (await self.query("SELECT COUNT(*) AS n FROM processed_events"))[0]["n"] < expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"MySQL did not reach {expected} events")
            await asyncio.sleep(0.02)

    async def query(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        assert self.store is not None
        async with self.store.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, args or None)
            columns = [d[0] for d in cur.description]
            rows = [dict(zip(columns, row, strict=True)) for row in await cur.fetchall()]
            await conn.commit()  # end the snapshot so the next poll sees new rows
            return rows
