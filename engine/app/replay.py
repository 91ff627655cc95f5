"""`tradeengine replay` (issue #18): recorded signals, ticks and funding through the real worker
parts and the paper venue, once per configuration of a grid (conflict policy, position mode,
MIN_CONFIDENCE, risk file), side by side. No NATS consumer, no venue, no MySQL write: a replay's
worker has no bus, and its paper venue is its own. The clock is the recording's, so the same
recording gives the same figures, byte for byte, however many processes run the grid.

A recording is JSON lines, one record each, in time order:
    {"at": "2026-11-30T12:00:00Z", "signal": {...the payload...}}
    {"at": "2026-11-30T12:00:01Z", "tick": {"symbol": "BTCUSDT", "price": "45000"}}
    {"at": "2026-11-30T16:00:00Z", "funding": {"symbol": "BTCUSDT", "rate": "0.0001"}}
`record_from_streams` writes one from what NATS keeps: the SIGNALS stream, the PRICE_HISTORY
bars and the funding rates the desk was paid at (EVENTS).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.adapters.paper import PaperExchange
from engine.app.worker import Worker
from engine.config import Settings, load_settings
from engine.domain.events import (
    Event,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    SignalDead,
    SignalDecided,
    parse_tick,
)
from engine.domain.model import (
    ZERO,
    CloseReason,
    PositionMode,
    SameDirectionPolicy,
    amount,
    decimal_text,
    load_json_exact,
)
from engine.domain.price_history import decode_bar

if TYPE_CHECKING:
    from engine.adapters.nats_bus import NatsBus

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
EQUITY_POINTS = 1000  # a configuration's equity curve is thinned to about this many points
Progress = Callable[[str, int, int], None]  # (what finished, how many before it, of how many)


@dataclass(frozen=True, slots=True)
class Record:
    at: datetime
    signal: dict[str, Any] | None = None
    tick: dict[str, Any] | None = None
    funding: dict[str, Any] | None = None


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
    net_pnl: Decimal = ZERO  # realized, net of fees, plus funding
    fees: Decimal = ZERO
    funding: Decimal = ZERO  # received (negative: paid)
    max_drawdown: Decimal = ZERO
    peak_exposure: Decimal = ZERO  # the most notional open at once, at entry prices
    opened: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    _peak: Decimal = ZERO
    _exposure: Decimal = ZERO

    def open(self, event: PositionOpened) -> None:
        self.opened += 1
        self.fees += event.fee  # (its share is in the closes' realized PnL too)
        self._exposure += event.quantity * event.entry_price
        self.peak_exposure = max(self.peak_exposure, self._exposure)

    def close(self, event: PositionClosed) -> None:
        self.trades += 1
        self.wins += event.realized_pnl > 0
        self.tp_hits += event.close_reason is CloseReason.TAKE_PROFIT
        self.sl_hits += event.close_reason is CloseReason.STOP_LOSS
        self.fees += event.exit_fee
        self._exposure -= event.closed_quantity * event.entry_price
        self._gain(event.realized_pnl)

    def fund(self, event: PositionFunding) -> None:
        self.funding += event.amount
        self._gain(event.amount)

    def _gain(self, pnl: Decimal) -> None:
        self.net_pnl += pnl
        self._peak = max(self._peak, self.net_pnl)
        self.max_drawdown = max(self.max_drawdown, self._peak - self.net_pnl)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trades": self.trades, "wins": self.wins,
            "win_rate": None if not self.trades else Decimal(self.wins) / self.trades,
            "tp_hits": self.tp_hits, "sl_hits": self.sl_hits, "net_pnl": self.net_pnl, "fees": self.fees,
            "funding": self.funding, "max_drawdown": self.max_drawdown, "peak_exposure": self.peak_exposure,
            "opened": self.opened, "rejected": dict(sorted(self.rejected.items())),
        }  # fmt: skip


@dataclass
class Outcome:
    """One configuration's result: per strategy, and the whole book's equity over time."""

    strategies: dict[str, Figures]
    equity: list[tuple[datetime, Decimal]]  # (time, net PnL of every strategy), thinned
    records: int


def csv_rows(results: dict[str, Any]) -> list[list[str]]:
    """The results flat: one row a configuration and strategy, every figure in full."""
    head = ["configuration", "in_force", "strategy", "trades", "wins", "win_rate", "tp_hits", "sl_hits", "net_pnl",
            "fees", "funding", "max_drawdown", "peak_exposure", "opened", "rejected"]  # fmt: skip
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


def _time(raw: Any) -> datetime:
    at = datetime.fromisoformat(str(raw if raw is not None else EPOCH.isoformat()).replace("Z", "+00:00"))
    return at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)


def iter_recording(path: str) -> Iterator[Record]:
    """The records of a JSON-lines recording, read as they are needed (a month of ticks need
    not fit in memory); a line that is not a record is an error naming it."""
    with Path(path).open() as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                funding = raw.get("funding")
                if funding is not None and not _is_funding(funding):
                    raise ValueError(f"funding needs a symbol and a finite rate, not {str(funding)[:80]}")
                yield Record(_time(raw.get("at")), raw.get("signal"), raw.get("tick"), funding)
            except (ValueError, AttributeError, ArithmeticError) as exc:
                raise ValueError(f"{path}:{n}: not a record: {exc}") from None


def _is_funding(raw: Any) -> bool:
    try:
        return isinstance(raw.get("symbol"), str) and Decimal(str(raw.get("rate"))).is_finite()
    except ArithmeticError:
        return False


def load_recording(path: str) -> list[Record]:
    return list(iter_recording(path))


def grid(
    policies: list[str], modes: list[str], confidences: list[str], risk_files: list[str] | None = None
) -> list[Config]:
    return [
        Config(SameDirectionPolicy(p), PositionMode(m), Decimal(c), r)
        for p, m, c, r in itertools.product(policies, modes, confidences, risk_files or [None])  # type: ignore[list-item]
    ]


class _Tally:
    """Where a replay's worker stores its events: folded into figures as they come, not NATS."""

    def __init__(self) -> None:
        self.figures: dict[str, Figures] = {}
        self.equity: list[tuple[datetime, Decimal]] = []
        self.total = ZERO
        self.signer = None
        self.replicas = 1

    def _of(self, strategy: str) -> Figures:
        found = self.figures.get(strategy)
        if found is None:
            found = self.figures[strategy] = Figures()
        return found

    async def publish_events(self, events: list[Event], ack_timeout: float = 10.0) -> None:
        for event in events:
            if isinstance(event, PositionClosed):
                self._of(event.strategy_id).close(event)
                self._moved(event.occurred_at, event.realized_pnl)
            elif isinstance(event, PositionOpened):
                self._of(event.strategy_id).open(event)
            elif isinstance(event, PositionFunding):
                self._of(event.strategy_id).fund(event)
                self._moved(event.occurred_at, event.amount)
            elif isinstance(event, SignalDecided) and event.outcome.value == "rejected":
                self._of(event.strategy_id).rejected[event.reason_code] += 1
            elif isinstance(event, SignalDead) and event.strategy_id:
                self._of(event.strategy_id).rejected[f"dead:{event.reason_code}"] += 1

    def _moved(self, at: datetime, pnl: Decimal) -> None:
        self.total += pnl
        self.equity.append((at, self.total))


def thin(points: list[tuple[datetime, Decimal]], most: int = EQUITY_POINTS) -> list[tuple[datetime, Decimal]]:
    """About `most` points of a curve, evenly by count; the last always kept."""
    if len(points) <= most:
        return points
    step = math.ceil(len(points) / most)
    kept = points[::step]
    return kept if kept[-1] is points[-1] else [*kept, points[-1]]


async def run_one(records: Iterable[Record], config: Config, base: Settings) -> Outcome:
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
    records = iter(records)
    first = next(records, None)
    now = [first.at if first is not None else EPOCH]
    # Funding is the recording's, paid when it says: never the paper venue's own schedule.
    venue = PaperExchange(
        config.mode, settings.paper_taker_fee, settings.paper_slippage, balance=settings.paper_balance
    )
    tally = _Tally()
    worker = Worker(settings, bus=tally, gateway=venue, clock=lambda: now[0])  # type: ignore[arg-type]
    on_price, handle = worker.prices.on_price, worker.signals.handle
    count = 0
    for sequence, record in enumerate(itertools.chain([first] if first else [], records), 1):
        count = sequence
        now[0] = record.at
        if record.tick is not None:
            symbol = str(record.tick.get("symbol"))
            tick = parse_tick(f"prices.{symbol}", json.dumps(record.tick).encode())
            if not isinstance(tick, str) and venue.market(tick[0]) is not None:
                await on_price(*tick)
        if record.signal is not None:  # the worker's own path for a delivery, dead letters included
            payload = record.signal
            subject = f"signals.{payload.get('strategy_id')}.{payload.get('symbol')}"
            await handle(subject, json.dumps(payload).encode(), None, sequence)
        if record.funding is not None:
            symbol, rate = str(record.funding.get("symbol")), Decimal(str(record.funding.get("rate")))
            if venue.market(symbol) is not None:
                venue.pay_funding(symbol, rate, record.at)
                await worker.book_funding()
    await worker.flush()
    return Outcome(dict(sorted(tally.figures.items())), thin(tally.equity), count)


def _run_in_process(path: str, config: Config, base: Settings) -> Outcome:
    """One configuration in a process of its own: the recording read again from the file."""
    from engine.logs import configure_logging

    configure_logging(base.log_format, "WARNING")  # the replay's decisions are figures, not logs
    return asyncio.run(run_one(iter_recording(path), config, base))


async def replay(
    source: str | list[Record],
    configs: list[Config],
    base: Settings | None = None,
    jobs: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every configuration's figures, in grid order; the configuration in force (the
    settings') marked. `source` is a recording's path or its records; with a path and `jobs`
    above 1, configurations run in that many processes at once."""
    base = base or load_settings()
    live = Config(
        base.same_direction_conflict_resolution, base.position_mode, base.min_confidence, base.risk_file
    )
    outcomes: list[Outcome | None] = [None] * len(configs)
    done = 0

    def finished(i: int, outcome: Outcome) -> None:
        nonlocal done
        outcomes[i] = outcome
        if progress is not None:
            progress(str(configs[i]), done, len(configs))
        done += 1

    if isinstance(source, str) and jobs > 1 and len(configs) > 1:
        loop = asyncio.get_running_loop()
        # spawn: a fresh interpreter per process, nothing of this one's event loop or threads
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(configs)), mp_context=context) as pool:

            async def one(i: int, config: Config) -> None:
                finished(i, await loop.run_in_executor(pool, _run_in_process, source, config, base))

            await asyncio.gather(*(one(i, config) for i, config in enumerate(configs)))
    else:
        for i, config in enumerate(configs):
            records = iter_recording(source) if isinstance(source, str) else source
            finished(i, await run_one(records, config, base))
    results: dict[str, Any] = {}
    for config, outcome in zip(configs, outcomes, strict=True):
        assert outcome is not None
        results[str(config)] = {
            "in_force": config == live,
            "records": outcome.records,
            "strategies": {strategy: f.as_dict() for strategy, f in outcome.strategies.items()},
            "equity": [[at.isoformat().replace("+00:00", "Z"), total] for at, total in outcome.equity],
        }
    return results


@dataclass
class Recorded:
    counts: dict[str, int]  # signals, ticks, funding payments (and unreadable signals) written
    booked: dict[str, Decimal]  # per strategy: the net PnL booked live on the positions its signals opened


async def record_from_streams(
    bus: NatsBus,
    path: str,
    since: datetime,
    until: datetime,
    strategies: set[str] | None = None,
    symbols: set[str] | None = None,
    bar_slack: timedelta = timedelta(days=1),
) -> Recorded:
    """Write to `path` the recording NATS keeps for [since, until]: the signals of the SIGNALS
    stream (at the time the stream stored them), the ticks of the PRICE_HISTORY bars and the
    funding rates the desk was paid at (EVENTS, `positions.funding.*`). `strategies` and
    `symbols` narrow what is taken; ticks and funding are kept for every symbol unless
    `symbols` is given. Returns how many of each were written, and what the desk booked on the
    positions those signals opened (closes and funding through `until`)."""
    from engine.adapters.nats_bus import EVENTS_STREAM, PRICE_HISTORY_STREAM, SIGNALS_STREAM
    from engine.domain.events import decode_event
    from engine.domain.signals import derive_signal_id

    counts = Counter[str]()
    signals: list[tuple[datetime, int, str]] = []
    taken: set[tuple[Any, Any]] = set()  # (strategy_id, signal_id) of the signals taken
    async for msg in bus.read_stream(SIGNALS_STREAM, since, until):
        try:
            # As the worker reads it: exact decimals, kept exact in the recording as strings.
            payload = load_json_exact(msg.data)
        except ValueError:
            counts["unreadable_signals"] += 1  # dead-lettered live under every configuration alike
            continue
        if (
            not isinstance(payload, dict)
            or (strategies is not None and payload.get("strategy_id") not in strategies)
            or (symbols is not None and payload.get("symbol") not in symbols)
        ):
            continue
        at = msg.metadata.timestamp
        signals.append((at, 1, json.dumps({"at": _stamp(at), "signal": payload}, default=decimal_text)))
        raw_id = payload.get("signal_id")
        taken.add((payload.get("strategy_id"), raw_id if raw_id is not None else derive_signal_id(payload)))
    signals.sort(key=lambda t: t[0])  # stream order, unless the server's clock stepped back
    counts["signals"] = len(signals)

    ticks: list[tuple[datetime, int, str]] = []
    # A bar is stored once its interval has ended: read past `until` by the slack, and from
    # before `since` by the slack, keeping only the points inside the range.
    async for msg in bus.read_stream(PRICE_HISTORY_STREAM, since - bar_slack, until + bar_slack):
        bar = decode_bar(msg.data)
        if symbols is not None and bar.symbol not in symbols:
            continue
        for point in bar.points:
            if since <= point.at <= until:
                tick = {"symbol": bar.symbol, "price": format(point.price, "f")}
                ticks.append((point.at, 0, json.dumps({"at": _stamp(point.at), "tick": tick})))
    ticks.sort(key=lambda t: t[0])
    counts["ticks"] = len(ticks)

    # Funding rates and what the desk booked: the positions the recorded signals opened, their
    # closes and funding through `until`.
    funding: dict[tuple[str, datetime], tuple[datetime, int, str]] = {}
    opened: set[str] = set()
    booked: dict[str, Decimal] = {}
    async for msg in bus.read_stream(EVENTS_STREAM, since, until + bar_slack, subject="positions.>"):
        event = decode_event(msg.data)
        if isinstance(event, PositionOpened):
            if (event.strategy_id, event.signal_id) in taken:
                opened.add(event.strategy_position_id)
                booked.setdefault(event.strategy_id, ZERO)
        elif isinstance(event, PositionClosed):
            if event.strategy_position_id in opened and event.occurred_at <= until:
                booked[event.strategy_id] += event.realized_pnl
        elif isinstance(event, PositionFunding) and since <= event.funding_time <= until:
            if event.strategy_position_id in opened:
                booked[event.strategy_id] += event.amount
            if event.rate is None or (symbols is not None and event.symbol not in symbols):
                continue
            paid = {"symbol": event.symbol, "rate": format(event.rate, "f")}
            funding.setdefault(
                (event.symbol, event.funding_time),
                (event.funding_time, 2, json.dumps({"at": _stamp(event.funding_time), "funding": paid})),
            )
    counts["funding"] = len(funding)

    # In time order; at one instant, the price first, then the signal, then funding.
    merged = heapq.merge(ticks, signals, sorted(funding.values()), key=lambda t: (t[0], t[1]))
    await asyncio.to_thread(_write_lines, path, (line for _, _, line in merged))
    return Recorded(dict(counts), dict(sorted(booked.items())))


def check_booked(results: dict[str, Any], booked: dict[str, Decimal]) -> bool | None:
    """Put what the desk booked beside the replay of the configuration in force, and say whether
    they agree to the last decimal, strategy by strategy (None: no configuration in force in the
    grid). They agree when the configuration was live over the range and every bar held at most
    four ticks; a difference measures how far the replay's prices are from the ticks."""
    for result in results.values():
        if result["in_force"]:
            replayed = {s: f["net_pnl"] for s, f in result["strategies"].items() if f["opened"]}
            result["booked"] = booked
            result["matches_booked"] = replayed == booked
            return bool(result["matches_booked"])
    return None


def _write_lines(path: str, lines: Iterable[str]) -> None:
    with Path(path).open("w") as out:
        for line in lines:
            out.write(line + "\n")


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
