"""The signal worker: consume signals, decide, execute, publish events, ack (DESIGN §2, §4.3).

Handlers read like the use cases; the arithmetic and the rules live in `engine.domain`.
Every event goes through one ordered outbox, so the EVENTS stream holds them in the order
the book applied them, and a signal is acked only after its events are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import dataclasses
import gc
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import nats.errors
import structlog
from nats.aio.msg import Msg

from engine import logs, metrics
from engine.adapters.gateway import ExchangeGateway
from engine.adapters.leases import Holder, Lease, LeaseLost, carry_start_count, count_start
from engine.adapters.nats_bus import EVENTS_STREAM, SIGNALS_STREAM, NatsBus
from engine.adapters.nats_consumers import DurableConsumer, jetstream_sequences
from engine.adapters.paper import PaperExchange
from engine.adapters.snapshots import SnapshotStore
from engine.app.decisions import Decisions
from engine.app.kill_switch import KillSwitch
from engine.app.layout import check_layout, claim_layout
from engine.app.orders import OrderDesk
from engine.app.price_feed import PriceFeed
from engine.app.price_history import PriceHistoryRecorder
from engine.app.prices import Prices
from engine.app.protective_stops import ProtectiveStops
from engine.app.reconciler import Reconciler
from engine.app.signal_handler import SignalHandler
from engine.config import Settings, Switch
from engine.domain import snapshot
from engine.domain.book import PositionBook
from engine.domain.control import control_event, daily_loss_command_id
from engine.domain.events import (
    Event,
    PositionClosed,
    PositionFunding,
    PositionOpened,
)
from engine.domain.journal import OrderJournal
from engine.domain.ledger import SignalLedger
from engine.domain.model import (
    PositionKey,
)
from engine.domain.partitions import event_symbol, lane_name, partition_of, signal_filter
from engine.domain.reasons import DeadLetter
from engine.domain.risk import RiskBook
from engine.domain.signals import MalformedSignal, Signal
from engine.domain.state import EngineState

log = structlog.get_logger(__name__)
REPLAY_PROGRESS_EVERY = 50_000  # events between progress lines while recovering
SNAPSHOT_AFTER_START_SECONDS = 30.0
SNAPSHOT_LOAD_ATTEMPTS = 3  # a snapshot that timed out is asked for again before the stream is replayed whole
ORDER_HISTORY_REACH = timedelta(days=6, hours=20)
STALE_PRICE_LIMIT = 600.0  # seconds: a tick this old still stands in when the venue gives no price
LATE_LOOKUP_EVERY = 1.0  # seconds between lookups of an order whose request may still arrive
LOOKUP_COOLDOWN = 5.0  # seconds between lookups on a symbol whose venue did not answer
TICK_BACKLOG_LIMIT = 10_000
HOLD_LOOP_SECONDS = 0.05  # longest a batch holds the event loop before the rest gets a turn
FLATTEN_PASSES = 5  # per symbol, while its lock is held by a slow venue call


def release_free_memory() -> None:
    """glibc keeps freed heap memory for reuse; after a replay that is megabytes the worker
    will not need again. A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Suspects:
    """Messages in flight when an earlier process ended, handled one at a time."""

    floor: int  # the ack floor this start found
    until: int  # the last stream sequence delivered to that process
    starts: int | None  # starts in a row that handled a message at this floor (None: not counted yet)
    first: bool  # the next message is the first after the ack floor


class Worker:
    def __init__(
        self,
        settings: Settings,
        bus: NatsBus,
        gateway: ExchangeGateway,
        clock: Callable[[], datetime] = utc_now,
        partition: int | None = None,
    ) -> None:
        """`partition`: run that partition of the signals (SIGNAL_PARTITIONS > 1) and only its
        symbols; None: every signal, as the one worker of the desk."""
        self.settings = settings
        self.partition = partition
        self.durable = lane_name(settings.worker_durable, partition)
        self._role = "worker" if partition is None else self.durable
        self.bus = bus
        self.gateway = gateway
        self.clock = clock
        risk = settings.risk()
        self.rules = risk.rules
        self.state = EngineState(risk.limits, clock())
        # Real venues get a write-ahead journal; the paper venue is rebuilt from the book.
        self.journaled = not isinstance(gateway, PaperExchange)
        self.stops: ProtectiveStops | None = None
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.last_prices: dict[str, Decimal] = {}
        self.price_seen_at: dict[str, float] = {}
        self.stopping = asyncio.Event()
        self.wake_reconcile = asyncio.Event()
        # The parts: each a use case over the state, sharing this runner (engine.app.runtime).
        self.decisions = Decisions(self)
        self.desk = OrderDesk(self, self.decisions)
        self.prices = Prices(self, self.desk)
        self.signals = SignalHandler(self, self.rules, self.decisions, self.desk, self.prices)
        self.reconciler = Reconciler(self, self.desk)
        self.kill_switch = KillSwitch(
            bus,
            f"{self.durable}-control",
            self.risk,
            clock,
            self.emit,
            self.flush,
            self.prices.flatten,
        )
        self.ready = asyncio.Event()
        self._outbox: list[Event] = []
        self._flush_lock = asyncio.Lock()
        self._price_sub: Any = None
        self._background_flush: asyncio.Task[None] | None = None
        self._abandoned_events = False
        self._snapshots: SnapshotStore | None = None
        self._snapshotting: asyncio.Task[None] | None = None
        self._events_since_snapshot = 0
        self.recovered: tuple[int, int] = (0, 0)
        self.lease: Lease | None = None
        self.standby = False  # waiting for another worker's lease on the durable
        self._fenced = False  # the lease was lost: nothing more is placed or stored

    # The state's parts by name, and the parts' entry points, for callers and tests.
    @property
    def book(self) -> PositionBook:
        return self.state.book

    @property
    def ledger(self) -> SignalLedger:
        return self.state.ledger

    @property
    def journal(self) -> OrderJournal:
        return self.state.journal

    @property
    def risk(self) -> RiskBook:
        return self.state.risk

    @property
    def price_feed(self) -> PriceFeed | None:
        return self.prices.feed

    async def on_signal_message(self, msg: Msg) -> None:
        await self.signals.on_signal_message(msg)

    async def on_signal(self, signal: Signal, sequence: int) -> None:
        await self.signals.on_signal(signal, sequence)

    async def on_price_message(self, msg: Msg) -> None:
        await self.prices.on_price_message(msg)

    async def on_price(self, symbol: str, price: Decimal) -> None:
        await self.prices.on_price(symbol, price)

    async def reconcile_all(self) -> None:
        await self.reconciler.reconcile_all()

    async def resolve_pending(self) -> None:
        await self.desk.resolve_pending()

    async def book_funding(self) -> None:
        await self.reconciler.book_funding()

    # --- lifecycle -----------------------------------------------------------------------
    def owns(self, symbol: str) -> bool:
        return self.partition is None or (
            partition_of(symbol, self.settings.signal_partitions) == self.partition
        )

    def _owns_event(self, subject: str) -> bool:
        symbol = event_symbol(subject)
        return symbol is None or self.owns(symbol)

    async def run(self, lease: Lease | None = None) -> None:
        """Take the durable's lease (waiting as a standby while another worker holds it), or
        run under `lease`, already taken; run until stopped. A lost lease stops the worker
        before it stores or places anything more."""
        if self.partition is not None:  # every line of this partition's task and its children says so
            structlog.contextvars.bind_contextvars(partition=self.partition)
        if lease is None:
            await claim_layout(self.bus, self.settings)
            lease = Lease(self.bus.js, self.durable, self.settings.worker_lease_seconds, self.bus.replicas)
            if not await lease.acquire(self.settings.worker_standby, self.stopping, self._on_standby):
                return
            try:  # a standby may have waited while other workers changed the layout
                await check_layout(self.bus, self.settings)
            except BaseException:
                await lease.release()
                raise
        self.lease = lease
        keeper = asyncio.create_task(self._keep_lease(lease))
        try:
            await self._run_leased()
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            if not self._fenced:
                await lease.release()

    def _on_standby(self, holder: Holder | None) -> None:
        self.standby = True

    def check_lease(self) -> None:
        """Nothing is placed or stored without a lease renewed recently enough that no other
        worker can hold it (cheap: a clock read)."""
        if self.lease is not None and not self._fenced and not self.lease.confirmed():
            self._fence("the lease could not be renewed in time; another worker may hold it now")
        if self._fenced:
            raise LeaseLost("this worker lost its lease: nothing more is placed or stored")

    def _fence(self, why: str) -> None:
        self._fenced = True
        self._outbox.clear()  # never stored now: the next holder decides these signals again
        log.error(
            "worker.lease_lost", error=why, why="this one stops without placing or storing anything more"
        )
        self.stop()

    async def _keep_lease(self, lease: Lease) -> None:
        try:
            await lease.keep(self.stopping)
        except LeaseLost as exc:
            self._fence(str(exc))

    async def _run_leased(self) -> None:
        await self.gateway.start()
        await self.recover()
        # Signals past the ack floor come again: an order of theirs the venue never placed is
        # decided by their redelivery, not by the lookup.
        self.desk.redelivered_from = await self.bus.ack_floor(SIGNALS_STREAM, self.durable) + 1
        await self.desk.resolve_pending_at_start()
        self.desk.redelivered_from = None
        await self._start_stops()  # before reconciling: a stop that fired while we were down is ours
        try:
            await self.reconcile_all()
        except Exception as exc:  # the venue may be unreachable now: the periodic round retries
            log.warning("reconcile.failed", error=repr(exc))
        self.bus.on_reconnect.append(self.wake_reconcile.set)
        # The book is a large, long-lived object graph: keep the cyclic GC from rescanning it
        # (full collections grew into 100+ ms pauses in the latency bench).
        gc.collect()
        release_free_memory()  # what the replay's decoding used and freed goes back to the OS
        gc.freeze()
        gc.set_threshold(50_000, 50, 1000)
        await self.prices.restore_prices()
        on_price = self.prices.on_price_message
        if self.partition is not None:
            own, symbol_at = self.owns, len("prices.")

            async def on_price(msg: Msg) -> None:  # another partition's symbol: its worker's tick
                if own(msg.subject[symbol_at:]):
                    await self.prices.on_price_message(msg)

        if self.settings.price_history_days:
            self.prices.history = PriceHistoryRecorder(
                self.bus, self.settings.price_history_interval, self.clock
            )
        self._price_sub = await self.bus.subscribe_prices(on_price)
        sub = await self.bus.durable_consumer(SIGNALS_STREAM, self.durable, signal_filter(self.partition))
        suspects = self._suspects(sub)
        self.standby = False
        self.ready.set()
        log.info("worker.ready", open_positions=len(self.book.positions), venue=self.gateway.name)
        gauges = asyncio.create_task(self.report_gauges())
        upkeep = asyncio.create_task(self.reconciler.keep_reconciling())
        funding = asyncio.create_task(self.reconciler.keep_funding())
        feed = self.prices.start_feed()
        keeper = asyncio.create_task(self.stops.keep(self.stopping)) if self.stops else None
        control = asyncio.create_task(self.kill_switch.keep(self.stopping))
        history = self.prices.history
        recording = asyncio.create_task(history.keep(self.stopping)) if history is not None else None
        storing: asyncio.Task[None] | None = None
        try:
            while not self.stopping.is_set():
                if storing is not None and (storing.done() or sub.restarting):
                    # A failure to store or ack stops the worker now, not when the next batch
                    # comes; and an ack goes out before the consumer is re-created.
                    await storing
                    storing = None
                carried: list[Msg] = []
                if suspects is not None:
                    # Messages a process died on: one at a time, each acked before the next.
                    if storing is not None:
                        await storing
                        storing = None
                    suspects, carried = await self._handle_suspect(sub, suspects)
                    if not carried:
                        continue
                msgs = carried + await sub.next_batch(
                    self.settings.fetch_batch - len(carried), idle_wait=0.001 if carried else 0.5
                )
                if not msgs:
                    continue
                started = time.perf_counter()
                await self.decide_batch(msgs)
                # The batch before this one was being stored while this one was decided: one
                # JetStream round trip per batch off the critical path, still one flush at a
                # time and every ack after its events are stored.
                if storing is not None:
                    await storing
                storing = asyncio.create_task(self.store_and_ack(msgs, started))
            if storing is not None:
                await storing
        finally:
            self.ready.clear()
            self.stopping.set()
            self.wake_reconcile.set()
            # No TP/SL order may start after this point: stop the price feed and its runners.
            if feed is not None:
                await asyncio.gather(feed, return_exceptions=True)
            if keeper is not None:
                await asyncio.gather(keeper, return_exceptions=True)
            await asyncio.gather(control, return_exceptions=True)
            if self._price_sub is not None:
                with contextlib.suppress(Exception):
                    await self._price_sub.unsubscribe()
            if recording is not None:  # after the last tick: its bar is stored too
                await asyncio.gather(recording, return_exceptions=True)
            # Tick runners, and price writes waiting for their turn: nothing outlives the worker.
            runners = [
                t for t in (*self.prices.tick_runners.values(), *self.prices.background) if not t.done()
            ]
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
            if storing is not None and not storing.done():
                with contextlib.suppress(Exception):  # its batch stays unacked: redelivered
                    await storing
            with contextlib.suppress(ValueError):
                self.bus.on_reconnect.remove(self.wake_reconcile.set)
            try:
                await self.flush()
            finally:
                await asyncio.gather(gauges, upkeep, funding, return_exceptions=True)
                if self._snapshotting is not None:
                    await asyncio.gather(self._snapshotting, return_exceptions=True)
                log.info("worker.stopped")

    def stop(self) -> None:
        self.stopping.set()

    def _suspects(self, sub: DurableConsumer) -> Suspects | None:
        """The crash-loop breaker. Messages delivered to a process that ended without acking
        them are suspects. A start is counted (per ack floor, in NATS KV) only when it is about
        to handle the first of them; when starts keep finding the same floor, the suspects are
        taken one at a time (so the floor stops right before the one that kills the process),
        and past MAX_DELIVER such starts the first of them is dead-lettered unread."""
        if sub.in_flight_at_start is None:
            return None
        floor, delivered = sub.in_flight_at_start
        return Suspects(floor=floor, until=delivered, starts=None, first=True)

    async def _handle_suspect(
        self, sub: DurableConsumer, suspects: Suspects
    ) -> tuple[Suspects | None, list[Msg]]:
        """Handle the next suspect; returns what is left of them and the message to hand to an
        ordinary batch instead (the first one, when this start is the first at its floor)."""
        msgs = await sub.next_batch(1, idle_wait=0.5)
        if not msgs:
            return suspects, []
        (msg,) = msgs
        sequence = jetstream_sequences(msg)[0]
        if suspects.starts is None:
            try:
                starts = await count_start(self.bus.js, self.durable, suspects.floor, self.bus.replicas)
            except Exception as exc:  # the breaker is a safety net: never a reason to stop
                log.warning("worker.start_count_failed", error=repr(exc))
                starts = 1
            if starts < 2 or sequence > suspects.until:
                return None, [msg]  # an ordinary start: the batch goes on as usual
            log.warning(
                "worker.careful_start",
                ack_floor=suspects.floor,
                in_flight_until=suspects.until,
                starts_at_this_floor=starts,
                max_deliver=self.settings.max_deliver,
            )
            suspects = dataclasses.replace(suspects, starts=starts)
        assert suspects.starts is not None
        if suspects.first and suspects.starts > self.settings.max_deliver:
            poison = MalformedSignal(
                DeadLetter.POISON,
                (
                    f"{suspects.starts} starts in a row ended while this message was being handled "
                    f"(MAX_DELIVER={self.settings.max_deliver}); set aside unread",
                ),
            )
            self.emit(self.decisions.dead_letter(msg.subject, msg.data, msg.headers, poison, sequence))
            await self.store_and_ack([msg], time.perf_counter())
            suspects = dataclasses.replace(suspects, starts=1)  # the next suspect starts its own count
        else:
            await self.process_batch([msg])
        if sequence >= suspects.until:
            return None, []
        with contextlib.suppress(Exception):  # a safety net: never a reason to stop
            await carry_start_count(
                self.bus.js, self.durable, sequence, suspects.starts or 1, self.bus.replicas
            )
        return dataclasses.replace(suspects, first=False), []

    async def checks(self) -> dict[str, bool]:
        return {"worker_consumer": self.ready.is_set(), "worker_lease": not self.standby and not self._fenced}

    def details(self) -> dict[str, Any]:
        """Shown in /readyz, deciding nothing: what is halted, whether the venue answers the
        price feed."""
        found = self.kill_switch.details()
        if self.price_feed is not None:
            found["price_feed_fresh"] = self.price_feed.fresh(time.monotonic())
        return found

    async def report_gauges(self, every: float = 5.0) -> None:
        """Consumer backlog and per-key exposure, refreshed off the hot path."""
        shown: set[tuple[str, str]] = set()
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):  # a gauge must never take the worker down
                info = await self.bus.js.consumer_info(SIGNALS_STREAM, self.durable)
                metrics.CONSUMER_PENDING.labels(self._role).set(info.num_pending)
                metrics.CONSUMER_ACK_PENDING.labels(self._role).set(info.num_ack_pending)
                metrics.CONSUMER_REDELIVERED.labels(self._role).set(info.num_redelivered)
            now_shown: set[tuple[str, str]] = set()
            for key, keyed in self.book.by_key.items():
                labels = (key.symbol, key.side.value)
                now_shown.add(labels)
                metrics.OPEN_POSITIONS_BY_KEY.labels(*labels).set(len(keyed))
                metrics.EXPOSURE_BY_KEY.labels(*labels).set(float(self.book.key_cost(key)))
            for labels in shown - now_shown:
                metrics.OPEN_POSITIONS_BY_KEY.labels(*labels).set(0)
                metrics.EXPOSURE_BY_KEY.labels(*labels).set(0)
            shown = now_shown
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), every)
        for labels in shown:  # a partition moving to another process takes its exposure along
            metrics.OPEN_POSITIONS_BY_KEY.labels(*labels).set(0)
            metrics.EXPOSURE_BY_KEY.labels(*labels).set(0)

    async def recover(self) -> None:
        """Rebuild the book and the dedupe ledger from our own events (DESIGN §2)."""
        count, started = 0, time.monotonic()
        after = await self._load_snapshot() if self.settings.snapshot_every_events else 0
        apply = self.state.apply
        accept = None if self.partition is None else self._owns_event
        async for event in self.bus.replay_events(after=after, accept=accept):
            apply(event, True)
            count += 1
            if not count % REPLAY_PROGRESS_EVERY:  # a long history: say how far it has got
                log.info("worker.recovering", events=count, seconds=round(time.monotonic() - started, 1))
        self.state.end_replay()
        self.reconciler.known_until = self.state.last_event_at
        self._halt_on_losses(self.risk.today.by_strategy)  # a crash may have come between a loss and its halt
        self.kill_switch.report()
        if isinstance(self.gateway, PaperExchange):
            self.gateway.restore(self.book, self.state.replayed_cash)
        if self.partition is None:  # a partitioned process sums its partitions (engine.app.partitioned)
            metrics.OPEN_STRATEGY_POSITIONS.set_function(lambda: len(self.book.positions))
        self._events_since_snapshot = count
        self.recovered = (after, count)  # (the snapshot's stream sequence, events replayed after it)
        if self.settings.snapshot_every_events and count >= self.settings.snapshot_every_events:
            # A long replay is worth a snapshot, once the start's own work (journal lookups,
            # reconciliation, the backlog of signals) is done.
            self._events_since_snapshot = 0
            self._snapshotting = asyncio.create_task(
                self._snapshot_later(SNAPSHOT_AFTER_START_SECONDS), context=contextvars.Context()
            )
        log.info(
            "worker.recovered",
            snapshot_seq=after or None,
            events=count,
            open_positions=len(self.book.positions),
            orders_to_look_up=len(self.journal.pending),
        )

    # --- snapshots (issue #16: a start independent of history) -----------------------------
    def _snapshot_store(self) -> SnapshotStore:
        if self._snapshots is None:
            # A partition's snapshot holds its symbols' state under this partition count; under
            # another count the same partition holds other symbols.
            name = self.durable
            if self.partition is not None:
                name += f"-of{self.settings.signal_partitions}"
            self._snapshots = SnapshotStore(self.bus.js, name, self.bus.signer, self.bus.replicas)
        return self._snapshots

    async def _load_snapshot(self) -> int:
        """Take the last snapshot's state; the stream sequence it covers (0: none usable)."""
        try:
            for attempt in range(1, SNAPSHOT_LOAD_ATTEMPTS + 1):
                try:
                    found = await self._snapshot_store().load()
                    info = await self.bus.js.stream_info(EVENTS_STREAM)
                    break
                except TimeoutError:
                    # Ask again rather than replay the whole stream, which takes minutes after
                    # months of trading: a NATS node dying under a takeover, or the first look
                    # into a bucket several lanes created at once on a cluster (unanswered for
                    # the whole timeout, the next look answered at once; 6 lanes on 3 nodes).
                    if attempt == SNAPSHOT_LOAD_ATTEMPTS:
                        raise
                    log.warning("worker.snapshot_load_timed_out", attempt=attempt)
            if found is None:
                return 0
            seq, stream, data = found
            created = info.created.isoformat() if info.created else "-"
            if stream != created or seq > info.state.last_seq or info.state.first_seq > seq + 1:
                # Another stream (deleted and made again), or events gone past the snapshot.
                raise ValueError(
                    f"snapshot of stream {stream} at {seq}; EVENTS is {created}, {info.state.first_seq}"
                    f"..{info.state.last_seq}"
                )
            self.state.adopt(snapshot.load(data, self.state.risk.limits, self.state.started_at))
        except Exception as exc:  # unreadable, foreign or of another format: the whole stream
            log.warning("worker.snapshot_unusable", error=repr(exc)[:300])
            return 0  # the state is untouched: adopt runs only on a snapshot that loaded whole
        log.info("worker.snapshot_loaded", seq=seq, open_positions=len(self.book.positions))
        return seq

    def _count_stored(self, stored: int) -> None:
        every = self.settings.snapshot_every_events
        self._events_since_snapshot += stored
        if (
            every
            and self._events_since_snapshot >= every
            and (self._snapshotting is None or self._snapshotting.done())
        ):
            self._events_since_snapshot = 0
            # Its own context: the signal being handled now is not the snapshot's.
            self._snapshotting = asyncio.create_task(self.take_snapshot(), context=contextvars.Context())

    async def _snapshot_later(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)
        if not self.stopping.is_set():
            await self.take_snapshot()

    async def take_snapshot(self) -> None:
        """The state with every event of it stored, and the stream sequence that covers: taken
        under the flush lock with the outbox empty (each change of the state comes with its
        event in the outbox), then written in the background."""
        try:
            async with self._flush_lock:
                # A fenced worker, or one that dropped events on its way out, holds a state that
                # is not the stream's: no snapshot of it.
                self.check_lease()
                if self._abandoned_events:
                    return
                await self._flush_locked()
                # No await between the empty outbox and this: the state is what is stored.
                body = SnapshotStore.compress(snapshot.json_pieces(self.state))
                info = await self.bus.js.stream_info(EVENTS_STREAM)  # no flush meanwhile
                seq, created = info.state.last_seq, info.created.isoformat() if info.created else "-"
            self.check_lease()
            size = await self._snapshot_store().save(seq, body, created)
            log.info("worker.snapshot_saved", seq=seq, bytes=size, open_positions=len(self.book.positions))
            del body
            release_free_memory()  # the snapshot's buffers go back to the OS
        except Exception as exc:  # a snapshot is an optimisation: the next one comes
            log.warning("worker.snapshot_failed", error=repr(exc)[:300])

    # --- orders at the venue -------------------------------------------------------------
    # --- signals -------------------------------------------------------------------------
    async def process_batch(self, msgs: list[Msg]) -> None:
        """Decide a batch, store its events, ack it: `run` does the same with the storing of
        one batch overlapping the deciding of the next."""
        started = time.perf_counter()
        await self.decide_batch(msgs)
        await self.store_and_ack(msgs, started)

    async def decide_batch(self, msgs: list[Msg]) -> None:
        turn = time.perf_counter() + HOLD_LOOP_SECONDS
        for msg in msgs:
            await self.on_signal_message(msg)
            if time.perf_counter() > turn:
                # Deciding on the paper venue never waits: without this a batch would hold the
                # event loop for its whole length, and lease renewals (and the other partitions
                # of this process) with it. By time, not by count: a yield per few signals cost
                # 10 % of the throughput.
                await asyncio.sleep(0)
                turn = time.perf_counter() + HOLD_LOOP_SECONDS

    async def store_and_ack(self, msgs: list[Msg], started: float) -> None:
        await self.flush()
        if msgs:
            await msgs[-1].ack()  # AckPolicy.ALL: acknowledges the whole batch
        elapsed = time.perf_counter() - started
        log.debug("worker.batch", size=len(msgs), seconds=round(elapsed, 6))
        for _ in msgs:
            metrics.DECISION_LATENCY.observe(elapsed)

    # --- prices and TP/SL ----------------------------------------------------------------
    async def _start_stops(self) -> None:
        mode = self.settings.protective_stops
        if mode is Switch.OFF or (mode is Switch.AUTO and not self.gateway.quotes):
            return
        self.stops = ProtectiveStops(
            self.gateway,
            lambda: self.book,
            self.locks.__getitem__,
            self.settings.protective_stop_pct,
            self.check_lease,
        )
        try:
            await self.stops.load()
        except Exception as exc:  # the venue may be away: the keeper retries on its own
            log.warning("stops.load_failed", error=repr(exc)[:300])

    # --- events --------------------------------------------------------------------------
    def remember(self, event: Event, replay: bool = False) -> None:
        """Fold an event into the state; live, count it and let its consequences follow (a
        key's protective stop looked at, a day's loss past its limit halted)."""
        self.state.apply(event, replay)
        if replay:
            return
        kind = type(event)  # most events are decisions, which have no consequence here
        if kind is PositionOpened:
            assert isinstance(event, PositionOpened)
            # The original system's operators grep for these two lines.
            if logs.INFO:
                log.info(
                    f"Strategy position {event.strategy_position_id} created",
                    strategy_id=event.strategy_id,
                    symbol=event.symbol,
                    side=event.side.value,
                    quantity=str(event.quantity),
                    entry_price=str(event.entry_price),
                    exchange_position=event.exchange_position.key,
                )
            if self.stops is not None:
                self.stops.touch(PositionKey(event.symbol, event.side))
            metrics.child(metrics.STRATEGY_POSITIONS_OPENED, event.strategy_id).inc()
            if event.exchange_position.quantity_before == 0:
                metrics.child(metrics.EXCHANGE_POSITIONS_OPENED, event.side.value).inc()
        elif kind is PositionClosed:
            assert isinstance(event, PositionClosed)
            if logs.INFO:
                log.info(
                    f"Closed strategy position {event.strategy_position_id}",
                    strategy_id=event.strategy_id,
                    symbol=event.symbol,
                    side=event.side.value,
                    quantity=str(event.closed_quantity),
                    exit_price=str(event.exit_price),
                    reason=event.close_reason.value,
                    pnl=str(event.realized_pnl),
                )
            if self.stops is not None:
                self.stops.touch(PositionKey(event.symbol, event.side))
            metrics.child(
                metrics.STRATEGY_POSITIONS_CLOSED, event.strategy_id, event.close_reason.value
            ).inc()
            if event.realized_pnl >= 0:
                metrics.child(metrics.REALIZED_PNL, event.strategy_id).inc(float(event.realized_pnl))
            else:
                metrics.child(metrics.REALIZED_LOSS, event.strategy_id).inc(float(-event.realized_pnl))
                self._halt_on_losses((event.strategy_id,))
        elif kind is PositionFunding:
            assert isinstance(event, PositionFunding)
            metrics.child(metrics.FUNDING, event.strategy_id).inc(float(event.amount))
            if event.amount < 0:
                self._halt_on_losses((event.strategy_id,))

    _remember = remember

    def _halt_on_losses(self, strategies: Iterable[str]) -> None:
        """Halt a strategy (or the account) whose loss of the day reached its limit; recorded
        as an event, so `tradeengine status` shows it and a restart keeps it."""
        if not self.risk.limits.watches_daily_loss:
            return
        now = self.clock()
        for halt in self.risk.losses_past_limit(strategies, now):
            self.risk.halt(halt)
            log.error("risk.daily_loss_halt", scope=str(halt.scope), reason=halt.reason)
            self.emit(
                control_event(
                    self.risk,
                    daily_loss_command_id(halt),
                    "halt",
                    halt.scope,
                    "applied",
                    halt.reason,
                    now,
                    cause=halt.cause,
                    until=halt.until,
                )
            )
            self.kill_switch.report()

    def emit(self, event: Event) -> None:
        self._outbox.append(event)

    _emit = emit

    def flush_soon(self) -> None:
        if self._background_flush is None or self._background_flush.done():
            self._background_flush = asyncio.create_task(self.flush())

    async def flush(self) -> None:
        """Store every pending event; on failure keep them and retry: nothing is dropped.

        Only a stop request ends the retries (after a last 30 s): the signals behind the
        unpublished events are not acked, so the next start redelivers them, and the book that
        start replays never saw these events, so nothing is counted twice."""
        async with self._flush_lock:  # one flusher: retries keep stream order, acks wait for storage
            self.check_lease()
            if self._abandoned_events:
                # Events were dropped on the way out: nothing after them may count as stored
                # (no ack, no order sent on the strength of a journal entry).
                raise RuntimeError("events were abandoned while stopping; nothing more is stored")
            await self._flush_locked()

    _flush = flush

    async def _flush_locked(self) -> None:
        delay, give_up_at = 0.05, None
        while self._outbox:
            self.check_lease()  # every attempt: a retry may outlast the lease
            pending, self._outbox = self._outbox, []
            try:
                await self.bus.publish_events(pending)
                self._count_stored(len(pending))
            except BaseException as exc:
                self._outbox[:0] = pending  # kept, in order; a later flush sends them (ids deduplicate)
                if not isinstance(exc, nats.errors.Error | TimeoutError | RuntimeError) or isinstance(
                    exc, nats.errors.MaxPayloadError
                ):
                    # A cancellation, a bug, or an event NATS will never take: not retried here.
                    # The worker stops; the crash-loop breaker sets aside a message that keeps
                    # producing such an event.
                    raise
                metrics.PUBLISH_RETRIES.inc()
                log.warning("events.publish_failed", error=repr(exc), pending=len(self._outbox))
                if self.stopping.is_set():
                    give_up_at = give_up_at or time.monotonic() + 30
                    if time.monotonic() > give_up_at:
                        log.error("events.abandoned_on_stop", pending=len(self._outbox))
                        self._abandoned_events = True
                        self._outbox.clear()
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
