"""The desk view (`tradeengine positions`, `tradeengine status`): what the engine holds, read
from NATS alone, so it answers while a worker is down. Positions are the fold of the EVENTS
stream by the worker's own state (`EngineState`), valued at the last prices the worker keeps
(KV), with unrealized PnL before fees."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from nats.js.api import DeliverPolicy

from engine.adapters.event_signing import EventSigner
from engine.adapters.last_prices import PRICES_BUCKET, LastPrices
from engine.adapters.leases import LEASE_BUCKET, PARTITIONS_BUCKET, Holder
from engine.adapters.nats_bus import CONTROL_STREAM, EVENTS_STREAM, SIGNALS_STREAM, NatsBus
from engine.domain.events import decode_event
from engine.domain.model import amount
from engine.domain.partitions import lane_name
from engine.domain.pnl import gross_pnl
from engine.domain.state import EngineState


async def fold_events(
    bus: NatsBus,
    progress: Callable[[int, int], None] | None = None,
    signer: EventSigner | None = None,
    timeout: float = 600.0,
) -> EngineState:
    """Every stored event, folded as a restarting worker would (an ordered consumer: no durable
    is left behind, and a reader's permissions suffice). Like the worker's replay it skips an
    event without the worker's signature (with `signer`) and one it cannot read, and it ends
    when nothing is pending, whatever became of the last message."""
    state = EngineState()
    info = await bus.js.stream_info(EVENTS_STREAM)
    last = info.state.last_seq
    if not info.state.messages:
        return state
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: Any) -> None:
        nonlocal seen
        seen += 1
        try:
            if signer is None or signer.trusts(msg.subject, msg.data, msg.headers):
                state.apply(decode_event(msg.data), replay=True)
        except Exception:
            pass  # not an event of ours: the worker's replay would not fold it either
        if progress is not None and seen % 10_000 == 0:
            progress(seen, info.state.messages)
        if msg.metadata.sequence.stream >= last or msg.metadata.num_pending == 0:
            done.set()

    sub = await bus.js.subscribe(
        "", stream=EVENTS_STREAM, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    state.end_replay()
    return state


async def last_prices(bus: NatsBus) -> dict[str, tuple[Decimal, float]]:
    """symbol -> (last price, its age in seconds), as the worker stored them; {} if unreadable.
    The bucket is opened, never made: a reader may have no right to make it."""
    try:
        return await LastPrices(await bus.js.key_value(PRICES_BUCKET)).read_all()
    except Exception:
        return {}


def positions_view(
    state: EngineState, prices: dict[str, tuple[Decimal, float]], strategy: str | None, symbol: str | None
) -> dict[str, Any]:
    """Exchange positions per key with their slices, and exposure per strategy."""
    keys: list[dict[str, Any]] = []
    exposure: dict[str, dict[str, Decimal]] = {}
    for key, slices in state.book.by_key.items():
        if symbol and key.symbol != symbol:
            continue
        shown = [sp for sp in slices.values() if not strategy or sp.strategy_id == strategy]
        if not shown:
            continue
        ep = state.book.exchange[key]
        last = prices.get(key.symbol)
        rows = []
        for sp in shown:
            unrealized = gross_pnl(sp.side, sp.entry_price, last[0], sp.remaining) if last else None
            rows.append({
                "strategy_position_id": sp.id, "strategy_id": sp.strategy_id, "quantity": sp.remaining,
                "entry_price": sp.entry_price, "take_profit": sp.take_profit, "stop_loss": sp.stop_loss,
                "unrealized_pnl": unrealized, "opened_at": sp.opened_at.isoformat(),
            })  # fmt: skip
            own = exposure.setdefault(sp.strategy_id, {"notional": Decimal(0), "unrealized_pnl": Decimal(0)})
            own["notional"] += sp.entry_price * sp.remaining
            if unrealized is not None:
                own["unrealized_pnl"] += unrealized
        keys.append({
            "key": str(key), "symbol": key.symbol, "side": key.side.value, "quantity": ep.quantity,
            "avg_entry_price": ep.avg_entry_price, "last_price": last[0] if last else None,
            "last_price_age_seconds": round(last[1], 1) if last else None, "slices": rows,
        })  # fmt: skip
    return {"positions": keys, "exposure": exposure}


async def streams_view(bus: NatsBus, durables: dict[str, str]) -> dict[str, Any]:
    """Each stream's size, and each role's consumer lag (role -> durable)."""
    streams: dict[str, Any] = {}
    for name in (SIGNALS_STREAM, EVENTS_STREAM, CONTROL_STREAM):
        try:
            info = await bus.js.stream_info(name)
        except Exception:
            streams[name] = None
            continue
        streams[name] = {
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "last_seq": info.state.last_seq,
        }
    consumers: dict[str, Any] = {}
    for role, durable in durables.items():
        stream = EVENTS_STREAM if role == "attribution" else SIGNALS_STREAM
        try:
            info = await bus.js.consumer_info(stream, durable)
        except Exception:
            consumers[role] = None
            continue
        consumers[role] = {"pending": info.num_pending, "ack_pending": info.num_ack_pending,
                           "redelivered": info.num_redelivered}  # fmt: skip
    return {"streams": streams, "consumers": consumers}


async def owners_view(bus: NatsBus, durable: str, partitions: int) -> list[dict[str, Any]]:
    """Who runs each partition (or the one durable) now: the lease's holder, and how long ago
    it renewed; None where nobody holds it."""
    bucket = PARTITIONS_BUCKET if partitions > 1 else LEASE_BUCKET
    lanes = [None] if partitions == 1 else list(range(partitions))
    try:
        kv = await bus.js.key_value(bucket)
    except Exception:
        kv = None
    found: list[dict[str, Any]] = []
    now = time.time()
    for partition in lanes:
        name = lane_name(durable, partition)
        holder = None
        if kv is not None:
            with contextlib.suppress(Exception):
                holder = Holder.decode((await kv.get(name)).value)
        found.append({
            "partition": partition, "lease": name,
            "holder": None if holder is None else {"host": holder.host, "pid": holder.pid,
                                                   "instance": holder.instance, "since": holder.since},
            "renewed_seconds_ago": None if holder is None else round(max(now - holder.renewed, 0.0), 1),
        })  # fmt: skip
    return found


def to_json(value: Any) -> str:
    return json.dumps(value, default=lambda v: amount(v) if isinstance(v, Decimal) else str(v), indent=2)
