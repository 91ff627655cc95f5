"""`tradeengine replay` (issue #18, a first part): recorded signals and ticks through the real
worker parts and the paper venue, once per configuration of a grid (conflict policy, position
mode and MIN_CONFIDENCE), side by side. No NATS, no venue, no MySQL: a replay's worker has no bus,
and its paper venue is its own. The clock is the recording's, so the same recording gives the same
figures, byte for byte.

A recording is JSON lines, one record each, in order:
    {"at": "2026-11-30T12:00:00Z", "signal": {...the payload...}}
    {"at": "2026-11-30T12:00:01Z", "tick": {"symbol": "BTCUSDT", "price": "45000"}}
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.config import Settings, load_settings
from engine.domain.events import Event, PositionClosed, PositionOpened, SignalDead, SignalDecided, parse_tick
from engine.domain.model import ZERO, CloseReason, PositionMode, SameDirectionPolicy, amount

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Record:
    at: datetime
    signal: dict[str, Any] | None = None
    tick: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Config:
    policy: SameDirectionPolicy
    mode: PositionMode
    min_confidence: Decimal
    risk_file: str | None = None  # RISK_FILE under this configuration (None: the base's)

    def __str__(self) -> str:
        risk = f"/risk={Path(self.risk_file).name}" if self.risk_file else ""
        return f"{self.policy.value}/{self.mode.value}/conf>={self.min_confidence}{risk}"


@dataclass
class Figures:
    """One strategy's result under one configuration."""

    trades: int = 0  # closes
    wins: int = 0
    tp_hits: int = 0
    sl_hits: int = 0
    net_pnl: Decimal = ZERO
    fees: Decimal = ZERO
    max_drawdown: Decimal = ZERO
    opened: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    _equity: Decimal = ZERO
    _peak: Decimal = ZERO

    def close(self, event: PositionClosed) -> None:
        self.trades += 1
        self.wins += event.realized_pnl > 0
        self.tp_hits += event.close_reason is CloseReason.TAKE_PROFIT
        self.sl_hits += event.close_reason is CloseReason.STOP_LOSS
        self.net_pnl += event.realized_pnl
        self.fees += event.exit_fee
        self._equity += event.realized_pnl
        self._peak = max(self._peak, self._equity)
        self.max_drawdown = max(self.max_drawdown, self._peak - self._equity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trades": self.trades, "wins": self.wins,
            "win_rate": None if not self.trades else Decimal(self.wins) / self.trades,
            "tp_hits": self.tp_hits, "sl_hits": self.sl_hits, "net_pnl": self.net_pnl, "fees": self.fees,
            "max_drawdown": self.max_drawdown, "opened": self.opened, "rejected": dict(sorted(self.rejected.items())),
        }  # fmt: skip


def csv_rows(results: dict[str, Any]) -> list[list[str]]:
    """The results flat: one row a configuration and strategy, every figure in full."""
    head = ["configuration", "in_force", "strategy", "trades", "wins", "win_rate", "tp_hits", "sl_hits", "net_pnl",
            "fees", "max_drawdown", "opened", "rejected"]  # fmt: skip
    rows = [head]
    for label, result in results.items():
        for strategy, f in result["strategies"].items():
            rows.append([
                label, str(result["in_force"]).lower(), strategy,
                *(("" if f[k] is None else amount(f[k]) if isinstance(f[k], Decimal) else str(f[k]))
                  for k in head[3:-1]),
                ";".join(f"{code}={n}" for code, n in f["rejected"].items()),
            ])  # fmt: skip
    return rows


def load_recording(path: str) -> list[Record]:
    records: list[Record] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            at = datetime.fromisoformat(str(raw.get("at", EPOCH.isoformat())).replace("Z", "+00:00"))
            records.append(Record(at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC),
                                  raw.get("signal"), raw.get("tick")))  # fmt: skip
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{path}:{n}: not a record: {exc}") from None
    return records


def grid(
    policies: list[str], modes: list[str], confidences: list[str], risk_files: list[str] | None = None
) -> list[Config]:
    return [
        Config(SameDirectionPolicy(p), PositionMode(m), Decimal(c), r)
        for p, m, c, r in itertools.product(policies, modes, confidences, risk_files or [None])  # type: ignore[list-item]
    ]


class _Sink:
    """Where a replay's worker stores its events: a list, not NATS."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.signer = None
        self.replicas = 1

    async def publish_events(self, events: list[Event], ack_timeout: float = 10.0) -> None:
        self.events.extend(events)


async def run_one(records: list[Record], config: Config, base: Settings) -> dict[str, Figures]:
    """The recording through one configuration; per strategy, what it would have made."""
    settings = base.model_copy(
        update={
            "same_direction_conflict_resolution": config.policy,
            "position_mode": config.mode,
            "min_confidence": config.min_confidence,
            "exchange": "paper",
            **({"risk_file": config.risk_file} if config.risk_file else {}),
        }
    )
    now = [records[0].at if records else EPOCH]
    venue = PaperExchange(
        config.mode, settings.paper_taker_fee, settings.paper_slippage, balance=settings.paper_balance
    )
    sink = _Sink()
    worker = Worker(settings, bus=sink, gateway=venue, clock=lambda: now[0])  # type: ignore[arg-type]
    for sequence, record in enumerate(records, 1):
        now[0] = record.at
        if record.tick is not None:
            symbol = str(record.tick.get("symbol"))
            tick = parse_tick(f"prices.{symbol}", json.dumps(record.tick).encode())
            if not isinstance(tick, str) and venue.market(tick[0]) is not None:
                await worker.prices.on_price(*tick)
        if record.signal is not None:  # the worker's own path for a delivery, dead letters included
            payload = record.signal
            subject = f"signals.{payload.get('strategy_id')}.{payload.get('symbol')}"
            await worker.signals.handle(subject, json.dumps(payload).encode(), None, sequence)
    await worker.flush()
    figures: dict[str, Figures] = {}
    for event in sink.events:
        if isinstance(event, PositionClosed):
            figures.setdefault(event.strategy_id, Figures()).close(event)
        elif isinstance(event, PositionOpened):
            own = figures.setdefault(event.strategy_id, Figures())
            own.opened += 1
            own.fees += event.fee  # (its share is in the closes' realized PnL too)
        elif isinstance(event, SignalDecided) and event.outcome.value == "rejected":
            figures.setdefault(event.strategy_id, Figures()).rejected[event.reason_code] += 1
        elif isinstance(event, SignalDead) and event.strategy_id:
            figures.setdefault(event.strategy_id, Figures()).rejected[f"dead:{event.reason_code}"] += 1
    return dict(sorted(figures.items()))


async def replay(
    records: list[Record], configs: list[Config], base: Settings | None = None
) -> dict[str, Any]:
    """Every configuration's figures; the configuration in force (the settings') marked."""
    base = base or load_settings()
    live = Config(
        base.same_direction_conflict_resolution, base.position_mode, base.min_confidence, base.risk_file
    )
    results: dict[str, Any] = {}
    for config in configs:
        figures = await run_one(records, config, base)
        results[str(config)] = {
            "in_force": config == live,
            "strategies": {strategy: f.as_dict() for strategy, f in figures.items()},
        }
    return results
