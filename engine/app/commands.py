"""Ops commands: migrate, publish, price, tail, report, halt, resume, flatten, status."""

from __future__ import annotations

import asyncio
import csv
import getpass
import json
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from engine.adapters.mysql_store import MysqlStore
from engine.adapters.nats_bus import EVENT_SUBJECTS, EVENTS_STREAM, MSG_ID, NatsBus, signal_msg_id
from engine.app import desk
from engine.app.report import ReportFilter, as_records, gather, render_html, render_terminal
from engine.app.runner import client_nats_url, mysql_target
from engine.config import ConfigError, Settings
from engine.domain.control import COMMANDS, BadCommand, parse_command
from engine.domain.events import (
    ControlApplied,
    Event,
    OrderFailed,
    OrderSettled,
    OrderSubmitted,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    PositionReconciled,
    SignalDead,
    SignalDecided,
    decode_event,
    parse_tick,
)
from engine.domain.model import amount
from engine.domain.partitions import lane_name
from engine.domain.risk import Scope

console = Console(highlight=False)


async def migrate(settings: Settings) -> int:
    # Migrations may rebuild large tables: no read timeout here.
    store = await MysqlStore.open(
        mysql_target(settings), connect_timeout=settings.mysql_connect_timeout, read_timeout=None
    )
    try:
        with Steps("migrations") as steps:
            applied = await store.migrate(progress=steps.step)
    finally:
        await store.close()
    console.print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
    return 0


LINE_EVERY = 30.0  # seconds between progress lines off a terminal


class Steps:
    """Progress of long work on stderr: a bar on a terminal, one line a step otherwise (a log,
    a pipe), so stdout stays the command's answer."""

    def __init__(self, what: str) -> None:
        self.what, self.started = what, time.monotonic()
        self.said = self.started  # when `advance` last printed a line
        self.out = Console(stderr=True, highlight=False)
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> Steps:
        if self.out.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.out, transient=True,
            )  # fmt: skip
            self.bar.start()
        return self

    def step(self, name: str, done: int, total: int) -> None:
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(self.what, total=total)
            self.bar.update(self.task, completed=done, description=f"{self.what}: {name}")
        else:
            self.out.print(
                f"{self.what}: {name} ({done + 1} of {total}, {time.monotonic() - self.started:.1f} s)"
            )

    def advance(self, done: int, total: int, note: str) -> None:
        """Work counted in units (records, rows): the bar moves; off a terminal, a line every
        LINE_EVERY seconds."""
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(self.what, total=total)
            self.bar.update(self.task, completed=done, total=total, description=f"{self.what}: {note}")
        elif time.monotonic() - self.said >= LINE_EVERY:
            self.said = time.monotonic()
            self.out.print(
                f"{self.what}: {done:,} of {total:,} ({note}, {time.monotonic() - self.started:.1f} s)"
            )

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


async def connect_client(settings: Settings, name: str) -> NatsBus:
    """The NATS connection of a client command: the configured server, credentials and TLS."""
    return await NatsBus.connect(
        client_nats_url(settings), name, settings.nats_connect_timeout, settings.nats_auth()
    )


# `tradeengine publish` exit codes: scripts can tell what became of the signal.
EXIT_ACCEPTED = 0  # accepted, or ignored (hold, nothing to close)
EXIT_REJECTED = 3
EXIT_DEAD_LETTER = 4
EXIT_DUPLICATE = 5  # the same signal id within the stream's 5-minute window, or decided before
EXIT_NO_ANSWER = 6  # no decision within --timeout: is a worker running?


async def publish(
    settings: Settings, payload: dict[str, Any], wait: float = 5.0, no_wait: bool = False
) -> int:
    payload.setdefault("signal_id", str(uuid.uuid4()))
    subject = f"signals.{payload.get('strategy_id')}.{payload.get('symbol')}"
    bus = await connect_client(settings, "tradeengine-publish")
    try:
        verdict: asyncio.Future[SignalDecided | SignalDead] = asyncio.get_running_loop().create_future()

        async def on_event(msg: Any) -> None:
            event = decode_event(msg.data)
            ours = isinstance(event, SignalDecided | SignalDead) and event.signal_id == payload["signal_id"]
            if ours and not verdict.done():
                verdict.set_result(event)  # type: ignore[arg-type]

        subs = [
            await bus.nc.subscribe(f"decisions.{payload.get('symbol')}", cb=on_event),
            await bus.nc.subscribe("deadletter.signals", cb=on_event),
        ]
        body = json.dumps(payload).encode()
        msg_id = signal_msg_id(str(payload.get("strategy_id")), str(payload["signal_id"]))
        try:
            fresh = await bus.publish_signal(subject, body, msg_id)
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            # No SIGNALS stream yet (a fresh server): create the streams as a worker would. A
            # strategy's own credentials need no stream rights while the stream exists.
            await bus.ensure_streams()
            fresh = await bus.publish_signal(subject, body, msg_id)
        if not fresh:
            console.print(
                f"duplicate: {payload['signal_id']} was published to {subject} within the last 5 minutes;"
                " JetStream kept the first, which is decided once"
            )
            earlier = await _earlier_decision(bus, str(payload.get("symbol")), str(payload["signal_id"]))
            console.print(describe(earlier) if earlier else "the first is not decided yet")
            return EXIT_DUPLICATE
        console.print(f"published {payload['signal_id']} to {subject}")
        if no_wait:
            return EXIT_ACCEPTED
        try:
            event = await asyncio.wait_for(verdict, timeout=wait)
        except TimeoutError:
            console.print(f"no decision within {wait:g}s: is a worker running? (--timeout)")
            return EXIT_NO_ANSWER
        finally:
            for sub in subs:
                await sub.unsubscribe()
        console.print(describe(event))
        if isinstance(event, SignalDead):
            return EXIT_DEAD_LETTER
        return {"rejected": EXIT_REJECTED, "duplicate": EXIT_DUPLICATE}.get(
            event.outcome.value, EXIT_ACCEPTED
        )
    finally:
        await bus.close()


async def _earlier_decision(bus: NatsBus, symbol: str, signal_id: str) -> SignalDecided | SignalDead | None:
    """The decision of a signal published in the last minutes (the dedupe window): the
    decisions on its symbol and the dead letters since then, read once."""
    since = datetime.now(UTC) - timedelta(minutes=6)
    found: SignalDecided | SignalDead | None = None
    for subject in (f"decisions.{symbol}", "deadletter.signals"):
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        sub = await bus.js.subscribe(subject, stream=EVENTS_STREAM, ordered_consumer=True, config=config)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break  # caught up
                event = decode_event(msg.data)
                if isinstance(event, SignalDecided | SignalDead) and event.signal_id == signal_id:
                    found = event
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        if found is not None:
            return found
    return None


async def publish_price(settings: Settings, symbol: str, price: str) -> int:
    # The worker's own rules for a tick, checked before anything is sent.
    body = json.dumps({"symbol": symbol, "price": price}).encode()
    problem = parse_tick(f"prices.{symbol}", body)
    if isinstance(problem, str):
        print(f"tradeengine: price: {problem}", file=sys.stderr)
        return 2
    bus = await connect_client(settings, "tradeengine-price")
    try:
        await bus.nc.publish(f"prices.{symbol}", body)
        await bus.nc.flush()
    finally:
        await bus.close()
    console.print(f"tick {symbol} {price}")
    return 0


async def control(
    settings: Settings,
    command: str,
    strategy: str | None,
    symbol: str | None,
    reason: str | None,
    wait: float,
) -> int:
    """Send a halt, resume or flatten and print what the worker changed."""
    payload: dict[str, Any] = {
        "command_id": str(uuid.uuid4()),
        "requested_by": f"{getpass.getuser()}@{socket.gethostname()}"[:200],
    }
    payload |= {k: v for k, v in (("strategy_id", strategy), ("symbol", symbol), ("reason", reason)) if v}
    body = json.dumps(payload).encode()
    problem = parse_command(f"control.{command}", body, 0)
    if isinstance(problem, BadCommand):
        print(f"tradeengine: {command}: {problem.error}", file=sys.stderr)
        return 2
    bus = await connect_client(settings, f"tradeengine-{command}")
    try:
        answer: asyncio.Future[ControlApplied] = asyncio.get_running_loop().create_future()

        async def on_event(msg: Any) -> None:
            event = decode_event(msg.data)
            if isinstance(event, ControlApplied) and event.command_id == payload["command_id"]:
                if not answer.done():
                    answer.set_result(event)

        sub = await bus.nc.subscribe(f"risk.{command}", cb=on_event)
        try:
            await bus.js.publish(f"control.{command}", body, headers={MSG_ID: payload["command_id"]})
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            print("tradeengine: no CONTROL stream yet: a worker creates it when it starts", file=sys.stderr)
            return 1
        console.print(f"sent {command} for {problem.scope} ({payload['command_id']})")
        try:
            event = await asyncio.wait_for(answer, timeout=wait)
        except TimeoutError:
            console.print(
                f"no worker confirmed within {wait:.0f}s; the command waits in the CONTROL stream and "
                "applies when a worker holds the lease"
            )
            return 1
        finally:
            await sub.unsubscribe()
        console.print(describe(event))
        _print_halts(event, datetime.now(UTC))
        return 1 if event.outcome == "rejected" else 0
    finally:
        await bus.close()


async def status(settings: Settings, as_json: bool = False) -> int:
    """What is halted (from the last control event the worker stored), the streams and the
    roles' consumer lag."""
    bus = await connect_client(settings, "tradeengine-status")
    try:
        latest: tuple[int, ControlApplied] | None = None
        for name in COMMANDS:
            try:
                msg = await bus.js.get_last_msg(EVENTS_STREAM, f"risk.{name}")
            except NotFoundError:
                continue
            event = decode_event(msg.data or b"{}")
            seq = msg.seq or 0
            if isinstance(event, ControlApplied):  # a refused command's event lists the halts too
                if latest is None or seq > latest[0]:
                    latest = (seq, event)
        consumers = _consumers("worker", settings.worker_durable, settings.signal_partitions) | _consumers(
            "attribution", settings.attribution_durable, settings.attribution_partitions
        )
        lag = await desk.streams_view(bus, consumers)
        owners = await desk.owners_view(bus, settings.worker_durable, settings.signal_partitions)
    finally:
        await bus.close()
    now = datetime.now(UTC)
    halts = [h for h in latest[1].halted if h.until is None or h.until > now] if latest else []
    if as_json:
        print(desk.to_json({"halted": [asdict(h) for h in halts], **lag, "owners": owners}))
        return 0
    if latest is None:
        console.print("nothing is halted (no control command has been applied)")
    else:
        _print_halts(latest[1], now)
    for name, stream in lag["streams"].items():
        console.print(
            f"stream {name}: "
            + (f"{stream['messages']} messages, {stream['bytes']} bytes" if stream else "missing")
        )
    for owner in owners:
        lease = "worker" if owner["partition"] is None else f"partition {owner['partition']}"
        holder = owner["holder"]
        console.print(
            f"{lease}: "
            + (
                f"held by {holder['host']} pid {holder['pid']} (instance {holder['instance']}), "
                f"renewed {owner['renewed_seconds_ago']}s ago"
                if holder
                else "[bold red]not held[/] (no worker runs it)"
            )
        )
    for role, consumer in lag["consumers"].items():
        console.print(
            f"{role}: "
            + (
                f"{consumer['pending']} pending, {consumer['ack_pending']} being handled"
                if consumer
                else "no consumer"
            )
        )
    return 0


async def watching(every: float | None, show: Callable[[], Awaitable[int]]) -> int:
    """Once, or again every `every` seconds (the screen cleared first) until interrupted."""
    if not every:
        return await show()
    while True:
        console.clear()
        console.print(f"[dim]{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC, every {every:g}s (Ctrl-C ends)[/]")
        code = await show()
        if code:
            return code
        await asyncio.sleep(every)


async def positions(
    settings: Settings, strategy: str | None, symbol: str | None, as_json: bool, venue: bool = False
) -> int:
    """Open exchange positions per key with their strategy slices, valued at the last price;
    with `venue`, what the venue itself holds beside each key (read only)."""
    bus = await connect_client(settings, "tradeengine-positions")
    try:
        state = await desk.fold_events(
            bus,
            lambda n, total: print(f"  read {n:,} of {total:,} events", file=sys.stderr),
            settings.event_signer(),
        )
        prices = await desk.last_prices(bus)
    finally:
        await bus.close()
    view = desk.positions_view(state, prices, strategy, symbol)
    if venue:
        held = await _venue_positions(settings)
        view["venue"] = {str(k): q for k, q in sorted(held.items()) if not symbol or k.symbol == symbol}
        for key in view["positions"]:
            key["venue_quantity"] = view["venue"].get(key["key"], Decimal(0))
    if as_json:
        print(desk.to_json(view))
        return 0
    if not view["positions"]:
        console.print("no open positions" + (" in this selection" if strategy or symbol else ""))
        return 0
    for key in view["positions"]:
        last = "-" if key["last_price"] is None else amount(key["last_price"])
        at_venue = f"  venue {amount(key['venue_quantity'])}" if "venue_quantity" in key else ""
        console.print(
            f"[bold]{key['key']}[/] {amount(key['quantity'])} @ {amount(key['avg_entry_price'])}  last {last}{at_venue}"
        )
        for row in key["slices"]:
            pnl = (
                "-"
                if row["unrealized_pnl"] is None
                else amount(row["unrealized_pnl"].quantize(Decimal("0.01")))
            )
            levels = " ".join(
                f"{name} {amount(row[field])}"
                for name, field in (("tp", "take_profit"), ("sl", "stop_loss"))
                if row[field]
            )
            console.print(
                f"  {row['strategy_id']:<20} {amount(row['quantity']):>12} @ {amount(row['entry_price']):<12} "
                f"uPnL {pnl:>10}  {levels}"
            )
    for strategy_id, figures in sorted(view["exposure"].items()):
        console.print(
            f"exposure {strategy_id}: notional {amount(figures['notional'].quantize(Decimal('0.01')))}, "
            f"uPnL {amount(figures['unrealized_pnl'].quantize(Decimal('0.01')))}"
        )
    return 0


def _print_halts(event: ControlApplied, now: datetime) -> None:
    halts = [h for h in event.halted if h.until is None or h.until > now]
    if not halts:
        console.print("nothing is halted")
        return
    for h in halts:
        scope = str(Scope(h.strategy_id, h.symbol))
        until = f" until {h.until.isoformat()}" if h.until else ""
        console.print(
            f"[bold red]HALTED[/] {scope} ({h.cause}) since {h.since.isoformat()}{until}: {h.reason}"
        )


def describe(event: Event) -> str:
    """One readable line per event."""
    match event:
        case SignalDecided():
            colour = {"accepted": "green", "rejected": "red", "duplicate": "yellow"}.get(event.outcome, "dim")
            return (
                f"[{colour}]DECIDED {event.outcome.value:<9}[/] {event.strategy_id} {event.action.value} "
                f"{event.symbol} {event.reason_code}: {event.reason}"
            )
        case PositionOpened():
            ep = event.exchange_position
            return (
                f"[cyan]OPENED[/] {event.strategy_id} {event.symbol} {event.side.value} {event.quantity} "
                f"@ {event.entry_price} tp={event.take_profit_price} sl={event.stop_loss_price} "
                f"| {ep.key} {ep.quantity_before}->{ep.quantity_after} avg {ep.avg_entry_price}"
            )
        case PositionClosed():
            colour = "green" if event.realized_pnl >= 0 else "red"
            return (
                f"[magenta]CLOSED[/] {event.strategy_id} {event.symbol} {event.side.value} "
                f"{event.closed_quantity} @ {event.exit_price} {event.close_reason.value} "
                f"pnl [{colour}]{event.realized_pnl}[/] left {event.remaining_quantity} "
                f"| {event.exchange_position.key} -> {event.exchange_position.quantity_after}"
            )
        case SignalDead():
            return f"[red]DEAD[/] {event.subject} {event.reason_code}: {'; '.join(event.errors)}"
        case PositionReconciled():
            return (
                f"[yellow]RECONCILED[/] {event.kind} {event.symbol} {event.side.value} "
                f"book {event.book_quantity} -> venue {event.venue_quantity} "
                f"({len(event.strategy_position_ids)} slice(s), orders {','.join(event.venue_order_ids)})"
            )
        case OrderSubmitted():
            return (
                f"[dim]ORDER[/] {event.client_order_id} {event.side} {event.quantity} {event.symbol} "
                f"{event.position_side.value if event.position_side else ''}"
            )
        case OrderSettled():
            return f"[dim]FILLED[/] {event.client_order_id} {event.filled_quantity} @ {event.average_price}"
        case OrderFailed():
            return f"[yellow]ORDER FAILED[/] {event.client_order_id} {event.reason_code}: {event.reason}"
        case PositionFunding():
            colour = "green" if event.amount >= 0 else "red"
            return (
                f"[blue]FUNDING[/] {event.strategy_id} {event.symbol} {event.side.value} "
                f"[{colour}]{event.amount}[/] rate {event.rate} mark {event.mark_price}"
            )
        case ControlApplied():
            return f"[bold red]CONTROL[/] {event.command} {event.outcome}: {event.reason}"


async def tail(
    settings: Settings, as_json: bool, strategy: str | None, symbol: str | None, from_start: bool
) -> int:
    bus = await connect_client(settings, "tradeengine-tail")
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def enqueue(msg: Any) -> None:
        await queue.put(msg)

    policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
    try:
        for subject in EVENT_SUBJECTS:
            await bus.js.subscribe(subject, cb=enqueue, ordered_consumer=True, deliver_policy=policy)
        while True:
            msg = await queue.get()
            event = decode_event(msg.data)
            if strategy and getattr(event, "strategy_id", None) != strategy:
                continue
            if symbol and getattr(event, "symbol", None) != symbol:
                continue
            if as_json:
                print(msg.data.decode(), flush=True)
            else:
                console.print(
                    describe(event), no_wrap=True, overflow="ellipsis", crop=True
                )  # one line an event
    finally:
        await bus.close()


async def report(settings: Settings, flt: ReportFilter, html_file: str | None, output: str = "table") -> int:
    store = await MysqlStore.open(
        mysql_target(settings),
        create_database=False,
        connect_timeout=settings.mysql_connect_timeout,
        read_timeout=settings.mysql_read_timeout,
    )
    try:
        with Steps("report") as steps:
            data = await gather(store, flt, progress=steps.step)
    finally:
        await store.close()
    if data.open_positions:
        data.value_open_positions(await _report_prices(settings))
    if output == "json":
        print(desk.to_json(as_records(data)))
    elif output == "csv":
        writer = csv.writer(sys.stdout)
        rows = as_records(data)["performance"]
        writer.writerow(rows[0].keys() if rows else ["strategy_id"])
        for row in rows:
            writer.writerow(
                "" if v is None else amount(v) if isinstance(v, Decimal) else v for v in row.values()
            )
    else:
        render_terminal(data, console)
    if html_file:
        await asyncio.to_thread(Path(html_file).write_text, render_html(data, datetime.now(UTC)))
        if output == "table":
            console.print(f"wrote {html_file}")
    return 0


async def _venue_positions(settings: Settings) -> dict[Any, Decimal]:
    """What the venue holds per key, asked read only (nothing about the account is set)."""
    from engine.app.runner import build_gateway

    if settings.exchange == "paper":
        raise ConfigError("--venue: the paper venue lives inside the worker; set EXCHANGE to a ccxt venue")
    gateway = build_gateway(settings)
    try:
        await gateway.start(read_only=True)
        return {key: held.quantity for key, held in (await gateway.positions()).items()}
    finally:
        await gateway.close()


async def _report_prices(settings: Settings) -> dict[str, Decimal]:
    """The worker's last prices, for unrealized PnL; none (shown as -) if NATS does not answer."""
    try:
        bus = await connect_client(settings, "tradeengine-report")
    except Exception:
        return {}
    try:
        return {symbol: price for symbol, (price, _) in (await desk.last_prices(bus)).items()}
    finally:
        await bus.close()


def _consumers(role: str, durable: str, partitions: int) -> dict[str, str]:
    """A role's consumers by the names `status` shows: one, or one a partition."""
    lanes = [None] if partitions == 1 else list(range(partitions))
    return {role if p is None else f"{role}-p{p}": lane_name(durable, p) for p in lanes}


def _count_lines(path: str) -> int:
    with Path(path).open("rb") as lines:
        return sum(1 for _ in lines)


async def replay(settings: Settings, args: Any) -> int:
    """`tradeengine replay`: the grid's figures side by side."""
    import os
    import tempfile

    from engine.app import replay as replaying
    from engine.logs import configure_logging

    configure_logging(settings.log_format, "WARNING")  # the replay's decisions are figures, not logs
    try:
        configs = replaying.grid(
            [p.strip() for p in args.policies.split(",")],
            [m.strip() for m in args.modes.split(",")],
            [c.strip() for c in args.min_confidence.split(",")],
            [r.strip() for r in args.risk_files.split(",")] if args.risk_files else None,
        )
        for config in configs:  # each risk file read now: a bad one is one error line, not a traceback
            if config.risk_file:
                settings.model_copy(update={"risk_file": config.risk_file}).risk()
        if args.jobs < 0:
            raise ValueError("--jobs must be 0 (one per core) or more")
    except (OSError, ValueError, ArithmeticError) as exc:  # ConfigError too: a bad RISK_FILE
        print(f"tradeengine: replay: {exc}", file=sys.stderr)
        return 2
    scratch: tempfile.TemporaryDirectory[str] | None = None
    try:
        if args.recording:
            path, described = args.recording, args.recording
        else:
            until = args.until or datetime.now(UTC)
            since = args.since or until - timedelta(days=7)
            if since >= until:
                print("tradeengine: replay: --since must be before --until", file=sys.stderr)
                return 2
            if args.save_recording:
                path = args.save_recording
            else:
                scratch = tempfile.TemporaryDirectory(prefix="tradeengine-replay-")
                path = str(Path(scratch.name) / "recording.jsonl")
            bus = await connect_client(settings, "tradeengine-replay")
            try:
                recorded = await replaying.record_from_streams(
                    bus, path, since, until,
                    {s.strip() for s in args.strategies.split(",")} if args.strategies else None,
                    {s.strip() for s in args.symbols.split(",")} if args.symbols else None,
                )  # fmt: skip
            finally:
                await bus.close()
            described = f"the streams, {since.isoformat()} to {until.isoformat()}"
            Console(stderr=True, highlight=False).print(
                "read "
                + ", ".join(f"{n:,} {what.replace('_', ' ')}" for what, n in recorded.counts.items())
                + (f"; kept in {path}" if args.save_recording else "")
            )
        jobs = args.jobs or os.cpu_count() or 1
        lines = await asyncio.to_thread(_count_lines, path)
        with Steps("replay") as steps:
            finished = [0]

            def config_done(name: str, done: int, total: int) -> None:
                finished[0] = done + 1
                if steps.bar is None:
                    steps.step(name, done, total)

            def records_done(done: int) -> None:
                note = f"{finished[0]} of {len(configs)} configurations done"
                steps.advance(done, lines * len(configs), note)

            results = await replaying.replay(
                path, configs, settings, jobs=jobs, progress=config_done, records_done=records_done
            )
        if not args.recording:
            replaying.check_booked(results, recorded.booked)
    except (OSError, ValueError) as exc:  # a recording's bad line, an unreadable file
        print(f"tradeengine: replay: {exc}", file=sys.stderr)
        return 2
    finally:
        if scratch is not None:
            scratch.cleanup()
    unlisted = sorted({symbol for result in results.values() for symbol in result["unlisted_symbols"]})
    if unlisted:
        Console(stderr=True, highlight=False).print(
            f"not replayed, the paper venue does not list them (PAPER_EXTRA_MARKETS): {', '.join(unlisted[:20])}"
            + (f" and {len(unlisted) - 20} more" if len(unlisted) > 20 else "")
        )
    if args.html:
        from engine.app.report import render_replay_html

        page = render_replay_html(results, described, datetime.now(UTC))
        await asyncio.to_thread(Path(args.html).write_text, page)
        Console(stderr=True, highlight=False).print(f"wrote {args.html}")
    if args.json:
        print(desk.to_json(results))
        return 0
    if args.csv:
        csv.writer(sys.stdout).writerows(replaying.csv_rows(results))
        return 0
    from rich import box
    from rich.table import Table

    records = next(iter(results.values()))["records"] if results else 0
    console.print(f"Replay of {records:,} records ({described}), one table per configuration")
    for label, result in results.items():
        # One table a configuration: each fits 80 columns, no number cut (peak exposure is in
        # --json, --csv and --html).
        table = Table(
            title=("* " if result["in_force"] else "") + label,
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for heading in ("strategy", "trades", "win %", "TP", "SL", "net PnL", "fees", "funding", "max DD",
                        "rejected"):  # fmt: skip
            table.add_column(heading, justify="left" if heading == "strategy" else "right",
                             overflow="fold", no_wrap=heading != "strategy", min_width=10 if heading == "strategy" else None)  # fmt: skip
        cents = Decimal("0.01")
        for strategy, f in result["strategies"].items():
            table.add_row(
                strategy, str(f["trades"]),
                "-" if f["win_rate"] is None else f"{f['win_rate'] * 100:.0f}",
                str(f["tp_hits"]), str(f["sl_hits"]),
                *(amount(f[k].quantize(cents)) for k in ("net_pnl", "fees", "funding", "max_drawdown")),
                str(sum(f["rejected"].values())),
            )  # fmt: skip
        console.print(table)
        still_open = {s: f["open_at_end"] for s, f in result["strategies"].items() if f["open_at_end"]}
        if still_open:
            console.print("  still open at the end, not in net PnL: "
                          + ", ".join(f"{s} {n}" for s, n in still_open.items()))  # fmt: skip
        if "booked" in result:
            if result["matches_booked"]:
                console.print("  [green]booked live over the range: the same, strategy by strategy[/]")
            else:
                replayed = {s: f["net_pnl"] for s, f in result["strategies"].items() if f["opened"]}
                console.print("  [yellow]booked live over the range, beside this replay:[/] " + "; ".join(
                    f"{s} {amount(result['booked'].get(s, Decimal(0)).quantize(cents))} booked, "
                    f"{amount(replayed.get(s, Decimal(0)).quantize(cents))} replayed"
                    for s in sorted({*result["booked"], *replayed})
                ) + " (prices between bars, or another configuration live then: docs/replay.md)")  # fmt: skip
    console.print("* the configuration in force (the worker's settings)")
    return 0
