"""Exactly-once across a restart (issue #14): an order request is lost to the worker (the
connection drops) but reaches the venue late, still inside its receive window. The worker is
killed with SIGKILL right after sending and restarted before the request arrives. The
restarted worker must not take "no such order" for "never placed" while a request may still
arrive: the venue ends with exactly one order for the client id, the signal's decision says
it was found after a lookup, and the position is booked once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import DeliverPolicy

from engine.adapters.embedded_nats import EmbeddedNats
from engine.adapters.nats_bus import NatsBus
from engine.domain.events import PositionOpened, SignalDecided, decode_event
from engine.emulator.binanceusdm import Fault
from tests.integration.harness import eventually, eventually_async
from tests.integration.processes import interrupt
from tests.integration.venues import Emulator

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "engine.cli"]
ARRIVES_AFTER = 6.0  # seconds: well after the restarted worker's first lookup
RECV_WINDOW_MS = 10_000  # the late request is still inside it when it arrives


@pytest.fixture
def worker_env(nats_server: EmbeddedNats, emulator: Emulator) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MYSQL_URL",)}
    env.update(
        NATS_URL=nats_server.url,
        EXCHANGE="binanceusdm",
        EXCHANGE_API_URL=emulator.url,
        EXCHANGE_API_KEY=emulator.exchange.api_key,
        EXCHANGE_API_SECRET=emulator.exchange.secret,
        SET_POSITION_MODE="true",
        LOG_FORMAT="json",
        ORDER_TIMEOUT_SECONDS="2",
        EXCHANGE_RECV_WINDOW_MS=str(RECV_WINDOW_MS),
        ORDER_SEND_SPAN_SECONDS="2",
        RECONCILE_INTERVAL_SECONDS="1",
        EXCHANGE_RATE_LIMIT_MS="1",
    )
    return env


@pytest.fixture
async def workers(emulator: Emulator) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """Stopped while this event loop keeps serving the emulator: a worker's last venue calls on
    its way out are answered, not left to time out (which cost 15 s a test)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        await asyncio.to_thread(interrupt, proc, 15)


def start_worker(env: dict[str, str], tmp: Path, started: list[subprocess.Popen[bytes]]) -> None:
    log = open(tmp / f"worker-{len(started)}.log", "wb")  # noqa: SIM115 - the child keeps it
    started.append(subprocess.Popen([*CLI, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT))
    log.close()


@pytest.mark.timeout(180)
async def test_a_request_arriving_late_after_a_restart_makes_one_order(
    nats_server: EmbeddedNats,
    emulator: Emulator,
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    nc, js, events = await first_worker_running(nats_server, worker_env, tmp_path, workers)
    try:
        emulator.exchange.faults.append(Fault(kind="late", seconds=ARRIVES_AFTER))
        payload = {
            "strategy_id": "late_v1",
            "symbol": "BTCUSDT",
            "action": "buy",
            "quantity": "0.007",
            "confidence": "0.9",
            "price": "45000",
            "signal_id": "late-1",
        }
        await js.publish("signals.late_v1.BTCUSDT", json.dumps(payload).encode())
        await eventually(
            lambda: emulator.exchange.request_count["POST /fapi/v1/order"] >= 1 or None,
            timeout=60,
            what="the order request sent",
        )
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        assert not emulator.exchange.orders, "the late request must not have arrived yet"

        start_worker(worker_env, tmp_path, workers)

        def decided() -> SignalDecided | None:
            return next((e for e in events if isinstance(e, SignalDecided) and e.signal_id == "late-1"), None)

        decision = await eventually(decided, timeout=60, what="the signal's decision")
        # The late request has reached the venue (and was executed or refused there).
        await asyncio.wait_for(asyncio.gather(*emulator.exchange.late), ARRIVES_AFTER + 10)
        await eventually(lambda: emulator.exchange.orders or None, timeout=30, what="the late order")
    finally:
        await nc.close()

    state = emulator.exchange.state()
    assert state["orders"] == 1, state
    assert state["duplicate_client_ids"] == {}
    assert state["positions"] == {"BTCUSDT_LONG": "0.007"}
    assert decision.outcome.value == "accepted" and decision.reason_code == "accepted_after_lookup", decision
    opened = [e for e in events if isinstance(e, PositionOpened)]
    assert len(opened) == 1 and opened[0].quantity == Decimal("0.007")


async def first_worker_running(
    nats_server: EmbeddedNats,
    worker_env: dict[str, str],
    tmp_path: Path,
    workers: list[subprocess.Popen[bytes]],
) -> tuple[Any, Any, list[Any]]:
    """A client following every event, and the first worker consuming signals."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await NatsBus(nc).ensure_streams()
    events: list[Any] = []

    async def collect(msg: Any) -> None:
        events.append(decode_event(msg.data))

    await js.subscribe(
        ">", stream="EVENTS", cb=collect, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    start_worker(worker_env, tmp_path, workers)
    await eventually_async(lambda: _has_consumer(js), timeout=60, what="the first worker consuming signals")
    return nc, js, events


async def _has_consumer(js: Any) -> bool:
    try:
        await js.consumer_info("SIGNALS", "tradeengine-worker")
    except Exception:
        return False
    return True


@pytest.mark.timeout(180)
async def test_an_order_in_parts_with_a_late_part_after_a_restart_sends_each_part_once(
    nats_server: EmbeddedNats,
    emulator: Emulator,
    worker_env: dict[str, str],
    workers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """0.007 BTC where the venue takes 0.003 an order: parts of 0.003, 0.002, 0.002. The second
    part's request is lost and arrives late; the worker is killed and restarted meanwhile. The
    restarted worker waits for the receive window before taking the parts it finds as the
    order: each part exists at most once at the venue, no part is sent after the crash, and
    the book holds what the venue holds."""
    btc = emulator.exchange.markets["BTCUSDT"]
    emulator.exchange.markets["BTCUSDT"] = dataclasses.replace(btc, max_market_qty=Decimal("0.003"))
    nc, js, events = await first_worker_running(nats_server, worker_env, tmp_path, workers)
    try:
        emulator.exchange.faults.append(Fault(kind="late", seconds=ARRIVES_AFTER, after=1))
        payload = {"strategy_id": "parts_v1", "symbol": "BTCUSDT", "action": "buy", "quantity": "0.007",
                   "confidence": "0.9", "price": "45000", "signal_id": "parts-1"}  # fmt: skip
        await js.publish("signals.parts_v1.BTCUSDT", json.dumps(payload).encode())
        await eventually(
            lambda: emulator.exchange.request_count["POST /fapi/v1/order"] >= 2 or None,
            timeout=60,
            what="the second part's request sent",
        )
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        assert len(emulator.exchange.orders) == 1, "only the first part may have arrived yet"
        start_worker(worker_env, tmp_path, workers)

        def decided() -> SignalDecided | None:
            return next(
                (e for e in events if isinstance(e, SignalDecided) and e.signal_id == "parts-1"), None
            )

        decision = await eventually(decided, timeout=60, what="the signal's decision")
        await asyncio.wait_for(asyncio.gather(*emulator.exchange.late), ARRIVES_AFTER + 10)
    finally:
        await nc.close()

    state = emulator.exchange.state()
    assert state["orders"] == 2 and state["duplicate_client_ids"] == {}, state
    assert state["positions"] == {"BTCUSDT_LONG": "0.005"}
    assert decision.outcome.value == "accepted" and decision.reason_code == "accepted_after_lookup", decision
    opened = [e for e in events if isinstance(e, PositionOpened)]
    assert len(opened) == 1 and opened[0].quantity == Decimal("0.005")
