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
import csv
import dataclasses
import heapq
import itertools
import json
import math
import multiprocessing
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.adapters.paper import PaperExchange, synthetic_markets
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
from engine.domain.price_history import PricePoint, decode_bar

if TYPE_CHECKING:
    from engine.adapters.nats_bus import NatsBus

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
EQUITY_POINTS = 1000  # a configuration's equity curve is thinned to about this many points
Progress = Callable[[str, int, int], None]  # (what finished, how many before it, of how many)
RecordsDone = Callable[[int], None]  # records done so far, over every configuration
COUNT_EVERY = 10_000


@dataclass(frozen=True, slots=True)
class Record:
    at: datetime
    signal: dict[str, Any] | None = None
    tick: dict[str, Any] | None = None
    funding: dict[str, Any] | None = None
    subject: str | None = None  # the signal's, as published (default: from its payload)


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
    open_at_end: int = 0  # slices still open when the recording ends: their PnL is not in net_pnl
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
            "opened": self.opened, "open_at_end": self.open_at_end, "rejected": dict(sorted(self.rejected.items())),
        }  # fmt: skip


@dataclass
class Outcome:
    """One configuration's result: per strategy, and the whole book's equity over time."""

    strategies: dict[str, Figures]
    equity: list[tuple[datetime, Decimal]]  # (time, net PnL of every strategy), thinned
    records: int
    unlisted: list[str]  # symbols of the recording the paper venue does not list: not replayed


def csv_rows(results: dict[str, Any]) -> list[list[str]]:
    """The results flat: one row a configuration and strategy, every figure in full."""
    head = ["configuration", "in_force", "strategy", "trades", "wins", "win_rate", "tp_hits", "sl_hits", "net_pnl",
            "fees", "funding", "max_drawdown", "peak_exposure", "opened", "open_at_end", "rejected"]  # fmt: skip
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
    """The records of a recording (JSON lines, or CSV when the name ends in `.csv`), read as
    they are needed (a month of ticks need not fit in memory); a line that is not a record is an
    error naming it."""
    if path.lower().endswith(".csv"):
        yield from _iter_csv(path)
        return
    with Path(path).open() as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield _record(json.loads(line))
            except (ValueError, AttributeError, ArithmeticError) as exc:
                raise ValueError(f"{path}:{n}: not a record: {exc}") from None


CSV_KINDS = ("signal", "tick", "funding")


def _iter_csv(path: str) -> Iterator[Record]:
    """A CSV recording: a header naming the columns, then a row a record. `at` and `type`
    (signal, tick or funding) in every row; a tick's `symbol` and `price`; funding's `symbol`
    and `rate`; a signal's fields by their own names (`strategy_id`, `symbol`, `action`,
    `quantity`, `confidence`, `take_profit_pct`, ...), empty cells left out, every value as the
    text it is (amounts as decimal strings)."""
    with Path(path).open(newline="") as lines:
        rows = csv.DictReader(lines)
        if rows.fieldnames is None or not {"at", "type"} <= set(rows.fieldnames):
            raise ValueError(f"{path}:1: a CSV recording's header names at least `at` and `type`")
        for row in rows:
            try:
                kind = row.get("type")
                if kind not in CSV_KINDS:
                    raise ValueError(f"type must be one of {', '.join(CSV_KINDS)}, not {kind!r}")
                given = {
                    k: v for k, v in row.items() if k not in ("at", "type") and k and v not in (None, "")
                }
                if kind == "tick":
                    raw: dict[str, Any] = {
                        "tick": {"symbol": given.get("symbol"), "price": given.get("price")}
                    }
                elif kind == "funding":
                    raw = {"funding": {"symbol": given.get("symbol"), "rate": given.get("rate")}}
                else:
                    raw = {"signal": given}
                yield _record({"at": row.get("at"), **raw})
            except (ValueError, AttributeError, ArithmeticError) as exc:
                raise ValueError(f"{path}:{rows.line_num}: not a record: {exc}") from None


def _record(raw: dict[str, Any]) -> Record:
    funding = raw.get("funding")
    if funding is not None and not _is_funding(funding):
        raise ValueError(f"funding needs a symbol and a finite rate, not {str(funding)[:80]}")
    subject = raw.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise ValueError("subject must be a string")
    return Record(_time(raw.get("at")), raw.get("signal"), raw.get("tick"), funding, subject)


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


async def run_one(
    records: Iterable[Record], config: Config, base: Settings, counted: Callable[[int], None] | None = None
) -> Outcome:
    """The recording through one configuration; per strategy, what it would have made.
    `counted` hears how many records are done, every COUNT_EVERY and at the end."""
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
        config.mode, settings.paper_taker_fee, settings.paper_slippage, balance=settings.paper_balance,
        markets=synthetic_markets(settings.paper_extra_markets),
    )  # fmt: skip
    unlisted: set[str] = set()  # symbols of the recording the paper venue does not list
    tally = _Tally()
    worker = Worker(settings, bus=tally, gateway=venue, clock=lambda: now[0])  # type: ignore[arg-type]
    on_price, handle = worker.prices.on_price, worker.signals.handle
    sequence = 0
    for sequence, record in enumerate(itertools.chain([first] if first else [], records), 1):
        if counted is not None and not sequence % COUNT_EVERY:
            counted(sequence)
        now[0] = record.at
        if record.tick is not None:
            symbol = str(record.tick.get("symbol"))
            tick = parse_tick(f"prices.{symbol}", json.dumps(record.tick).encode())
            if not isinstance(tick, str):
                if venue.market(tick[0]) is None:
                    unlisted.add(tick[0])
                else:
                    await on_price(*tick)
        if record.signal is not None:  # the worker's own path for a delivery, dead letters included
            payload = record.signal
            subject = record.subject or f"signals.{payload.get('strategy_id')}.{payload.get('symbol')}"
            await handle(subject, json.dumps(payload).encode(), None, sequence)
            if isinstance(payload.get("symbol"), str) and venue.market(payload["symbol"]) is None:
                unlisted.add(payload["symbol"])
        if record.funding is not None:
            symbol, rate = str(record.funding.get("symbol")), Decimal(str(record.funding.get("rate")))
            if venue.market(symbol) is not None:
                venue.pay_funding(symbol, rate, record.at)
                await worker.book_funding()
    await worker.flush()
    for position in worker.book.positions.values():
        tally._of(position.strategy_id).open_at_end += 1
    if counted is not None:
        counted(sequence)
    return Outcome(dict(sorted(tally.figures.items())), thin(tally.equity), sequence, sorted(unlisted))


_DONE: Any = None  # in a process of the pool: records done per configuration, shared with the parent


def _share(done: Any) -> None:
    global _DONE
    _DONE = done


def _run_in_process(path: str, config: Config, base: Settings, index: int) -> Outcome:
    """One configuration in a process of its own: the recording read again from the file."""
    from engine.logs import configure_logging

    configure_logging(base.log_format, "WARNING")  # the replay's decisions are figures, not logs

    def counted(n: int) -> None:
        _DONE[index] = n

    return asyncio.run(run_one(iter_recording(path), config, base, counted))


async def replay(
    source: str | list[Record],
    configs: list[Config],
    base: Settings | None = None,
    jobs: int = 1,
    progress: Progress | None = None,
    records_done: RecordsDone | None = None,
) -> dict[str, Any]:
    """Every configuration's figures, in grid order; the configuration in force (the
    settings') marked. `source` is a recording's path or its records; with a path and `jobs`
    above 1, configurations run in that many processes at once. `progress` hears of each
    configuration done; `records_done`, about every second, of the records done in all."""
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
        counts = context.Array("q", len(configs), lock=False)
        with ProcessPoolExecutor(
            min(jobs, len(configs)), mp_context=context, initializer=_share, initargs=(counts,)
        ) as pool:

            async def one(i: int, config: Config) -> None:
                finished(i, await loop.run_in_executor(pool, _run_in_process, source, config, base, i))

            running = asyncio.gather(*(one(i, config) for i, config in enumerate(configs)))
            while not running.done():
                await asyncio.wait([running], timeout=1.0)
                if records_done is not None:
                    records_done(sum(counts))
            await running
    else:
        counted: list[int] = []

        def count(n: int) -> None:
            if records_done is not None:
                records_done(sum(counted) + n)

        for i, config in enumerate(configs):
            records = iter_recording(source) if isinstance(source, str) else source
            ran = await run_one(records, config, base, count)
            counted.append(ran.records)
            finished(i, ran)
    results: dict[str, Any] = {}
    for config, outcome in zip(configs, outcomes, strict=True):
        assert outcome is not None
        results[str(config)] = {
            "in_force": dataclasses.replace(config, risk_file=config.risk_file or base.risk_file) == live,
            "records": outcome.records,
            "unlisted_symbols": outcome.unlisted,
            "strategies": {strategy: f.as_dict() for strategy, f in outcome.strategies.items()},
            "equity": [[_stamp(at), total] for at, total in outcome.equity],
        }
    return results


@dataclass
class Recorded:
    counts: dict[str, int]  # signals, ticks, funding payments (and unreadable signals) written
    booked: dict[str, Decimal]  # per strategy: the net PnL booked live on the positions its signals opened


Line = tuple[int, int, str]  # (microseconds since the epoch, kind: 0 tick, 1 signal, 2 funding, JSON line)
MICROSECOND = timedelta(microseconds=1)
BAR_SLACK = timedelta(minutes=1)  # how late after its interval a bar may be stored and still sort in


def _micros(at: datetime) -> int:
    return (at - EPOCH) // MICROSECOND


async def record_from_streams(
    bus: NatsBus,
    path: str,
    since: datetime,
    until: datetime,
    strategies: set[str] | None = None,
    symbols: set[str] | None = None,
) -> Recorded:
    """Write to `path` the recording NATS keeps for [since, until]: the signals of the SIGNALS
    stream with their subjects, each at the time the live worker decided it (at the time the
    stream stored it when no decision was stored); the ticks of the PRICE_HISTORY bars, each
    symbol's last price before `since` standing at `since`; and the funding rates the desk was
    paid at (EVENTS). `strategies` and `symbols` narrow what is taken; ticks and funding are kept
    for every symbol unless `symbols` is given. Returns how many of each were written, and what
    the desk booked on the positions those signals opened (closes and funding through `until`).
    Signals, decisions and the booked figures are held in memory; ticks go through a file."""
    from engine.adapters.nats_bus import EVENTS_STREAM, SIGNALS_STREAM
    from engine.domain.events import decode_event
    from engine.domain.signals import derive_signal_id

    counts = Counter[str]()
    # When the live worker decided each signal: that, not when it was stored, is where it stood
    # among the ticks (a backlog, a worker down for a while).
    decided: dict[tuple[str, str], deque[datetime]] = {}
    async for msg in bus.read_stream(EVENTS_STREAM, since, until, subject="decisions.>"):
        event = decode_event(msg.data)
        if isinstance(event, SignalDecided):
            decided.setdefault((event.strategy_id, event.signal_id), deque()).append(event.occurred_at)

    signals: list[Line] = []
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
        raw_id = payload.get("signal_id")
        key = (payload.get("strategy_id"), raw_id if raw_id is not None else derive_signal_id(payload))
        taken.add(key)
        times = decided.get(key)  # type: ignore[arg-type]
        at = times.popleft() if times else msg.metadata.timestamp
        subject = ".".join(msg.subject.split(".")[:3])  # as published: without a partition token
        line = json.dumps({"at": _stamp(at), "subject": subject, "signal": payload}, default=decimal_text)
        signals.append((_micros(at), 1, line))
    signals.sort()  # by time; at one instant, in stream order
    counts["signals"] = len(signals)

    funding: dict[tuple[str, datetime], Line] = {}
    opened: set[str] = set()
    booked: dict[str, Decimal] = {}
    async for msg in bus.read_stream(EVENTS_STREAM, since, until + BAR_SLACK, subject="positions.>"):
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
                (
                    _micros(event.funding_time),
                    2,
                    json.dumps({"at": _stamp(event.funding_time), "funding": paid}),
                ),
            )
    counts["funding"] = len(funding)

    with tempfile.TemporaryDirectory(prefix="tradeengine-ticks-") as scratch:
        ticks_path = Path(scratch) / "ticks"
        counts.update(await _spool_ticks(bus, ticks_path, since, until, symbols))
        # In time order; at one instant, the price first, then the signal, then funding.
        await asyncio.to_thread(_merge_into, path, ticks_path, signals, sorted(funding.values()))
    return Recorded(dict(counts), dict(sorted(booked.items())))


async def _spool_ticks(
    bus: NatsBus, spool: Path, since: datetime, until: datetime, symbols: set[str] | None
) -> Counter[str]:
    """The bars' points in [since, until] into `spool`, in time order: bars are stored once
    their interval has ended, so a point is written once the bars stored after it are a
    minute and two intervals past it. Each symbol's last point before `since` is its price at
    `since`. A bar stored later than that (a worker cut off from NATS) is written where it is
    read, and counted as late."""
    from engine.adapters.nats_bus import PRICE_HISTORY_STREAM

    counts = Counter[str]()
    waiting: list[Line] = []
    opening: dict[str, PricePoint] = {}
    started, written = False, -1

    def tick(symbol: str, point: PricePoint, at: datetime) -> Line:
        body = {"symbol": symbol, "price": format(point.price, "f")}
        return (_micros(at), 0, json.dumps({"at": _stamp(at), "tick": body}))

    # Small sequential writes, between reads that wait on NATS: not worth a thread each.
    with spool.open("w") as out:

        def write(line: Line) -> None:
            nonlocal written
            out.write(f"{line[0]}\t{line[2]}\n")
            written = max(written, line[0])
            counts["ticks"] += 1

        def flush(through: int) -> None:
            nonlocal started
            if not started and through >= _micros(since):
                started = True  # the opening prices come before anything else
                for symbol, point in sorted(opening.items()):
                    write(tick(symbol, point, since))
            while started and waiting and waiting[0][0] <= through:
                write(heapq.heappop(waiting))

        slack = timedelta(days=1)  # a day of bars before `since`: each symbol's opening price
        async for msg in bus.read_stream(PRICE_HISTORY_STREAM, since - slack, until + slack):
            bar = decode_bar(msg.data)
            if bar.start > until:
                continue
            if symbols is not None and bar.symbol not in symbols:
                continue
            for point in bar.points:
                if point.at < since:
                    if bar.symbol not in opening or opening[bar.symbol].at <= point.at:
                        opening[bar.symbol] = point
                elif point.at <= until:
                    line = tick(bar.symbol, point, point.at)
                    if started and line[0] < written:
                        counts["late_ticks"] += 1
                        write(line)
                    else:
                        heapq.heappush(waiting, line)
            lag = 2 * timedelta(seconds=bar.interval_seconds) + BAR_SLACK
            flush(_micros(msg.metadata.timestamp - lag))
        flush(_micros(until) + 1)
    return counts


def _merge_into(path: str, ticks: Path, signals: list[Line], funding: list[Line]) -> None:
    def spooled() -> Iterator[Line]:
        with ticks.open() as lines:
            for raw in lines:
                at, _, line = raw.rstrip("\n").partition("\t")
                yield int(at), 0, line

    with Path(path).open("w") as out:
        for _, _, line in heapq.merge(spooled(), signals, funding):
            out.write(line + "\n")


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


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")
