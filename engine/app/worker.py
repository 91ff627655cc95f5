"""The signal worker: consume signals, decide, execute, publish events, ack (DESIGN §2, §4.3).

Handlers read like the use cases; the arithmetic and the rules live in `engine.domain`.
Every event goes through one ordered outbox, so the EVENTS stream holds them in the order
the book applied them, and a signal is acked only after its events are stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import nats.errors
import structlog
from nats.aio.msg import Msg

from engine import metrics
from engine.adapters.gateway import ExchangeGateway, OrderRejected, OrderUncertain
from engine.adapters.last_prices import LastPrices
from engine.adapters.leases import Holder, Lease, LeaseLost, carry_start_count, count_start
from engine.adapters.nats_bus import SIGNALS_STREAM, DurableConsumer, NatsBus, jetstream_sequences
from engine.adapters.paper import PaperExchange
from engine.app.kill_switch import KillSwitch
from engine.app.price_feed import PriceFeed
from engine.app.protective_stops import ProtectiveStops
from engine.config import PriceFeedMode, Settings, Switch
from engine.domain.book import PositionBook
from engine.domain.control import control_event, daily_loss_command_id, restore_halts
from engine.domain.dead_letters import dead_letter
from engine.domain.decide import Accepted, close_intent, closes_by_key, decide, strategy_position_id_for
from engine.domain.events import (
    ControlApplied,
    Event,
    OrderFailed,
    OrderSettled,
    OrderSubmitted,
    PendingDecision,
    PositionClosed,
    PositionFunding,
    PositionOpened,
    PositionReconciled,
    SignalDead,
    SignalDecided,
    parse_tick,
)
from engine.domain.funding import SliceHistory, by_funding_time, split_funding
from engine.domain.journal import OrderJournal, intent_of
from engine.domain.ledger import SignalLedger
from engine.domain.model import (
    Action,
    ClientOrderId,
    CloseReason,
    Outcome,
    PositionKey,
    StrategyPositionId,
    derive_id,
)
from engine.domain.orders import CloseLeg, Fill, OrderIntent
from engine.domain.reconcile import EXTERNAL_STRATEGY, reconcile
from engine.domain.risk import RiskBook, Scope
from engine.domain.signals import MalformedSignal, Signal, parse_signal
from engine.logs import SIGNAL_CONTEXT

log = structlog.get_logger(__name__)
ORDER_HISTORY_REACH = timedelta(days=6, hours=20)
STALE_PRICE_LIMIT = 600.0  # seconds: a tick this old still stands in when the venue gives no price
LATE_LOOKUP_EVERY = 1.0  # seconds between lookups of an order whose request may still arrive
LOOKUP_COOLDOWN = 5.0  # seconds between lookups on a symbol whose venue did not answer
TICK_BACKLOG_LIMIT = 10_000
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
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.gateway = gateway
        self.clock = clock
        risk = settings.risk()
        self.rules = risk.rules
        self.risk = RiskBook(risk.limits)
        self.kill_switch = KillSwitch(
            bus, f"{settings.worker_durable}-control", self.risk, clock, self._emit, self._flush, self.flatten
        )
        self.book = PositionBook()
        self.ledger = SignalLedger()
        self.journal = OrderJournal()
        # Real venues get a write-ahead journal; the paper venue is rebuilt from the book.
        self.journaled = not isinstance(gateway, PaperExchange)
        self._last_event_at: datetime | None = None
        self._reconciled_at: dict[str, datetime] = {}
        self._attributed_orders: set[str] = set()  # venue orders reconciliation already booked
        self._wake_reconcile = asyncio.Event()
        self.last_prices: dict[str, Decimal] = {}
        self._price_seen_at: dict[str, float] = {}  # monotonic time of each symbol's last price
        self._not_found_yet: set[str] = set()  # journaled orders a late request may still place
        self._interest: dict[str, float] = {}  # symbol -> monotonic time of its last signal
        self._funding_refs: set[str] = set()  # venue funding payments already attributed
        self._funding_parts: dict[str, set[str]] = {}  # payments partly stored: the parts stored
        self._funded_through: dict[str, datetime] = {}  # per symbol: the last funding time booked
        self._slice_history = SliceHistory()  # which slices were open when: funding splits
        self._started_at = clock()
        self.price_feed: PriceFeed | None = None
        self.stops: ProtectiveStops | None = None
        self._price_store: LastPrices | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._outbox: list[Event] = []
        self._flush_lock = asyncio.Lock()
        self._symbol_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._price_sub: Any = None
        self._background_flush: asyncio.Task[None] | None = None
        self._abandoned_events = False
        self._redelivered_from: int | None = None
        self._lookup_cooldown: dict[str, float] = {}
        self._replayed_opens: set[str] = set()  # during recovery only
        self._replayed_cash = Decimal(0)  # closed PnL less every fee, over the replayed trades
        self._ticks: defaultdict[str, deque[Decimal]] = defaultdict(deque)
        self.lease: Lease | None = None
        self.standby = False  # waiting for another worker's lease on the durable
        self._fenced = False  # the lease was lost: nothing more is placed or stored
        self._tick_runners: dict[str, asyncio.Task[None]] = {}

    # --- lifecycle -----------------------------------------------------------------------
    async def run(self) -> None:
        """Take the durable's lease (waiting as a standby while another worker holds it), then
        run until stopped; a lost lease stops the worker before it stores or places anything
        more."""
        await self.bus.ensure_streams()
        lease = Lease(self.bus.js, self.settings.worker_durable, self.settings.worker_lease_seconds)
        if not await lease.acquire(self.settings.worker_standby, self._stopping, self._on_standby):
            return
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

    def _check_lease(self) -> None:
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
            await lease.keep(self._stopping)
        except LeaseLost as exc:
            self._fence(str(exc))

    async def _run_leased(self) -> None:
        await self.gateway.start()
        await self.recover()
        # Signals past the ack floor come again: an order of theirs the venue never placed is
        # decided by their redelivery, not by the lookup.
        self._redelivered_from = await self.bus.ack_floor(SIGNALS_STREAM, self.settings.worker_durable) + 1
        await self._resolve_pending_at_start()
        self._redelivered_from = None
        await self._start_stops()  # before reconciling: a stop that fired while we were down is ours
        try:
            await self.reconcile_all()
        except Exception as exc:  # the venue may be unreachable now: the periodic round retries
            log.warning("reconcile.failed", error=repr(exc))
        self.bus.on_reconnect.append(self._wake_reconcile.set)
        # The book is a large, long-lived object graph: keep the cyclic GC from rescanning it
        # (full collections grew into 100+ ms pauses in the latency bench).
        gc.collect()
        release_free_memory()  # what the replay's decoding used and freed goes back to the OS
        gc.freeze()
        gc.set_threshold(50_000, 50, 1000)
        await self._restore_prices()
        self._price_sub = await self.bus.subscribe_prices(self.on_price_message)
        sub = await self.bus.durable_consumer(SIGNALS_STREAM, self.settings.worker_durable, "signals.>")
        suspects = self._suspects(sub)
        self.standby = False
        self.ready.set()
        log.info("worker.ready", open_positions=len(self.book.positions), venue=self.gateway.name)
        gauges = asyncio.create_task(self.report_gauges())
        upkeep = asyncio.create_task(self.keep_reconciling())
        funding = asyncio.create_task(self.keep_funding())
        feed = self._start_price_feed()
        keeper = asyncio.create_task(self.stops.keep(self._stopping)) if self.stops else None
        control = asyncio.create_task(self.kill_switch.keep(self._stopping))
        storing: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
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
            self._stopping.set()
            self._wake_reconcile.set()
            # No TP/SL order may start after this point: stop the price feed and its runners.
            if feed is not None:
                await asyncio.gather(feed, return_exceptions=True)
            if keeper is not None:
                await asyncio.gather(keeper, return_exceptions=True)
            await asyncio.gather(control, return_exceptions=True)
            if self._price_sub is not None:
                with contextlib.suppress(Exception):
                    await self._price_sub.unsubscribe()
            runners = [t for t in self._tick_runners.values() if not t.done()]
            for runner in runners:
                runner.cancel()
            await asyncio.gather(*runners, return_exceptions=True)
            if storing is not None and not storing.done():
                with contextlib.suppress(Exception):  # its batch stays unacked: redelivered
                    await storing
            try:
                await self._flush()
            finally:
                await asyncio.gather(gauges, upkeep, funding, return_exceptions=True)
                log.info("worker.stopped")

    def stop(self) -> None:
        self._stopping.set()

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
                starts = await count_start(self.bus.js, self.settings.worker_durable, suspects.floor)
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
                "poison",
                (
                    f"{suspects.starts} starts in a row ended while this message was being handled "
                    f"(MAX_DELIVER={self.settings.max_deliver}); set aside unread",
                ),
            )
            self._emit(self._dead_letter(msg, poison, sequence))
            await self.store_and_ack([msg], time.perf_counter())
            suspects = dataclasses.replace(suspects, starts=1)  # the next suspect starts its own count
        else:
            await self.process_batch([msg])
        if sequence >= suspects.until:
            return None, []
        with contextlib.suppress(Exception):  # a safety net: never a reason to stop
            await carry_start_count(self.bus.js, self.settings.worker_durable, sequence, suspects.starts or 1)
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
        while not self._stopping.is_set():
            with contextlib.suppress(Exception):  # a gauge must never take the worker down
                info = await self.bus.js.consumer_info(SIGNALS_STREAM, self.settings.worker_durable)
                metrics.CONSUMER_PENDING.labels("worker").set(info.num_pending)
                metrics.CONSUMER_ACK_PENDING.labels("worker").set(info.num_ack_pending)
                metrics.CONSUMER_REDELIVERED.labels("worker").set(info.num_redelivered)
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
                await asyncio.wait_for(self._stopping.wait(), every)

    async def recover(self) -> None:
        """Rebuild the book and the dedupe ledger from our own events (DESIGN §2)."""
        count = 0
        async for event in self.bus.replay_events():
            self._remember(event, replay=True)
            count += 1
        self._replayed_opens = set()
        self._halt_on_losses(self.risk.today.by_strategy)  # a crash may have come between a loss and its halt
        self.kill_switch.report()
        if isinstance(self.gateway, PaperExchange):
            self.gateway.restore(self.book, self._replayed_cash)
        metrics.OPEN_STRATEGY_POSITIONS.set_function(lambda: len(self.book.positions))  # read when scraped
        log.info(
            "worker.recovered",
            events=count,
            open_positions=len(self.book.positions),
            orders_to_look_up=len(self.journal.pending),
        )

    # --- orders at the venue -------------------------------------------------------------
    async def _place(
        self, intent: OrderIntent, decision: PendingDecision | None = None
    ) -> OrderRejected | OrderUncertain | None:
        """Send one order and book its fill; None when booked. With a real venue the order is
        journaled (and stored) first, and an order the journal still holds open is looked up
        by client order id instead of being sent again (DESIGN §4.3)."""
        self._check_lease()
        if self.journaled:
            journaled = self.journal.pending.get(intent.client_order_id)
            if journaled is not None:
                try:
                    known = await self.gateway.find_order(intent.client_order_id, intent.symbol)
                except Exception as exc:
                    return OrderUncertain(f"{intent.client_order_id}: lookup failed ({exc!r})")
                final = self._outcome_final(journaled)
                if known is not None and (known.quantity >= journaled.quantity or final):
                    # Booked as sent, not as planned now; the signal being handled decides.
                    self._book_journaled(journaled, known, decide=False)
                    return None
                if not final:
                    self._wake_when_final(journaled)
                    return OrderUncertain(
                        f"{intent.client_order_id}: an earlier request may still reach the venue"
                    )
            journaled_at = self.clock()
            self._emit(self.journal.submit(intent, journaled_at, decision))
            await self._flush()  # stored before it is sent
            # No request of it may leave later than a restarted worker assumes (the journal
            # entry's time plus the send span), however long storing it took.
            not_after: datetime | None = journaled_at + timedelta(seconds=self.gateway.send_span_seconds)
        else:
            not_after = None
        self._check_lease()  # storing the journal entry may have taken long enough to lose it
        started = time.perf_counter()
        try:
            fill = await self.gateway.execute(intent, not_after)
        except OrderRejected as exc:
            metrics.ORDER_ERRORS.labels(self.gateway.name, exc.reason_code).inc()
            log.warning("order.rejected", reason_code=exc.reason_code, error=str(exc))
            if self.journaled:
                self._emit(self.journal.failed(intent, exc.reason_code, str(exc), self.clock()))
            return exc
        except Exception as exc:  # OrderUncertain, or anything unforeseen: the journal keeps it
            metrics.ORDER_ERRORS.labels(self.gateway.name, "uncertain").inc()
            log.error("order.uncertain", client_order_id=intent.client_order_id, error=repr(exc))
            return exc if isinstance(exc, OrderUncertain) else OrderUncertain(repr(exc))
        metrics.child(metrics.ORDER_LATENCY, self.gateway.name).observe(time.perf_counter() - started)
        self._book(intent, fill)
        if self.journaled:
            self._emit(self.journal.settled(intent, fill, self.clock()))
        return None

    def _book(self, intent: OrderIntent, fill: Fill) -> None:
        for event in self.book.settle(intent, fill, self.clock()):
            self._remember(event)
            self._emit(event)

    def _book_journaled(self, submitted: OrderSubmitted, fill: Fill, decide: bool) -> None:
        """Book a fill found at the venue for a journaled order, minus legs already booked,
        then (with `decide`) the decision it held back, then the record that closes it: if a
        crash stores only part of this, the entry is looked up again."""
        intent = intent_of(submitted)
        rest = self.journal.unbooked_part(intent, fill)
        if rest is not None:
            self._book(*rest)
        if decide:
            self._decide_after_lookup(submitted, filled=True)
        self._emit(self.journal.settled(intent, fill, self.clock()))
        self._rearm_still_open(intent)

    async def _resolve_pending_at_start(self) -> None:
        """Resolve the journal before taking signals. An order of a signal that will be
        redelivered is waited for while a request of it may still reach the venue: deciding
        "not placed" sooner would let the redelivery send it a second time (issue #14)."""
        while True:
            self._not_found_yet.clear()
            await self.resolve_pending()
            assert self._redelivered_from is not None
            waiting = [
                p
                for p in self.journal.pending.values()
                if p.client_order_id in self._not_found_yet
                and p.decision is not None
                and p.decision.signal_sequence >= self._redelivered_from
            ]
            if not waiting or self._stopping.is_set():
                return
            log.info(
                "worker.waiting_for_venue",
                orders=len(waiting),
                why="a request of these orders may still reach the venue; their signals wait",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), LATE_LOOKUP_EVERY)

    async def resolve_pending(self) -> None:
        """Look up every journaled order without an outcome: book it if the venue filled it,
        mark it failed if the venue never placed it (its signal may then place it again)."""
        for symbol in sorted({p.symbol for p in self.journal.pending.values()}):
            async with self._symbol_locks[symbol]:
                await self._resolve_symbol(symbol, cooldown=False)
        await self._flush()

    async def _resolve_symbol(self, symbol: str, *, cooldown: bool = True) -> bool:
        """Resolve the symbol's pending orders (its lock held); True when none is left. After
        a failed lookup the symbol waits LOOKUP_COOLDOWN before asking again, so an unreachable
        venue costs each signal of that symbol a rejection, not a minute of everyone's time."""
        if cooldown and time.monotonic() < self._lookup_cooldown.get(symbol, 0.0):
            return not self.journal.pending_on(symbol)
        for submitted in self.journal.pending_on(symbol):
            cid = ClientOrderId(submitted.client_order_id)
            intent = intent_of(submitted)
            try:
                fill = await self.gateway.find_order(cid, symbol)
            except Exception as exc:
                log.warning("order.lookup_failed", client_order_id=cid, error=repr(exc))
                self._lookup_cooldown[symbol] = time.monotonic() + LOOKUP_COOLDOWN
                break
            if fill is not None and (fill.quantity >= submitted.quantity or self._outcome_final(submitted)):
                log.info("order.found_at_venue", client_order_id=cid, quantity=str(fill.quantity))
                self._book_journaled(submitted, fill, decide=True)
            elif not self._outcome_final(submitted):
                # Not found, or found short: an order sent in parts may have a part whose
                # request is still on its way.
                # A request of this order may still reach the venue (receive window, clock
                # margin): "not found" proves nothing yet. Look again once it cannot.
                self._not_found_yet.add(cid)
                log.info(
                    "order.not_found_yet", client_order_id=cid, look_again_in=self._wake_when_final(submitted)
                )
            else:
                log.info("order.not_placed", client_order_id=cid)
                self._decide_after_lookup(submitted, filled=False)
                self._emit(
                    self.journal.failed(intent, "not_placed", "the venue has no such order", self.clock())
                )
                self._rearm_still_open(intent)
        return not self.journal.pending_on(symbol)

    def _outcome_final(self, submitted: OrderSubmitted) -> bool:
        closes_at = submitted.occurred_at + timedelta(seconds=self.gateway.unknown_outcome_seconds)
        return self.clock() >= closes_at

    def _wake_when_final(self, submitted: OrderSubmitted) -> float:
        """Wake the lookup round again soon (a late request may show up at the venue any
        moment), at the latest when the order's requests can no longer execute; returns the
        delay in seconds."""
        closes_at = submitted.occurred_at + timedelta(seconds=self.gateway.unknown_outcome_seconds)
        delay = min(max((closes_at - self.clock()).total_seconds(), 0.0) + 0.1, LATE_LOOKUP_EVERY)
        asyncio.get_running_loop().call_later(delay, self._wake_reconcile.set)
        return round(delay, 1)

    def _rearm_still_open(self, intent: OrderIntent) -> None:
        """Slices a resolved close left open (not placed, or partly filled) get their TP/SL back."""
        for leg in intent.legs:
            if isinstance(leg, CloseLeg) and leg.position_id in self.book.positions:
                self.book.rearm(self.book.positions[StrategyPositionId(leg.position_id)])

    async def keep_reconciling(self) -> None:
        """Periodically, and after a NATS reconnect: settle open orders, then reconcile."""
        every = self.settings.reconcile_interval_seconds
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_reconcile.wait(), every or None)
            self._wake_reconcile.clear()
            if self._stopping.is_set():
                return
            try:
                await self.resolve_pending()
                await self.reconcile_all()
            except Exception as exc:  # the venue may be down; try again next round
                log.warning("reconcile.failed", error=repr(exc))

    async def keep_funding(self) -> None:
        """Every FUNDING_POLL_SECONDS, book the venue's new funding payments on the symbols held,
        split over the slices that were open (issue #14)."""
        every = self.settings.funding_poll_seconds
        if not every:
            return
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), every)
            if self._stopping.is_set():
                return
            try:
                await self.book_funding()
            except Exception as exc:  # the venue may be down; the next round asks again
                log.warning("funding.failed", error=repr(exc)[:300])

    async def book_funding(self) -> None:
        """Ask the venue for new funding payments on every symbol held now or within the last
        day, and split each over the slices open at its funding time."""
        now = self.clock()
        self._slice_history.prune(now)
        for symbol in sorted(self._slice_history.symbols(self.book)):
            booked = self._funded_through.get(symbol)
            first = self._slice_history.earliest(self.book, symbol) or now
            since = booked + timedelta(microseconds=1) if booked is not None else first - timedelta(minutes=1)
            payments = await self.gateway.funding_since(symbol, since)
            async with self._symbol_locks[symbol]:
                for payment in by_funding_time(payments, self._funding_refs):
                    held = self._slice_history.open_at(self.book, symbol, payment.funding_time)
                    stored = self._funding_parts.get(payment.ref, set())
                    for event in split_funding(payment, held, self.clock()):
                        if event.event_id in stored:
                            continue  # this part was stored before a crash
                        log.info(
                            "position.funding",
                            strategy_id=event.strategy_id,
                            symbol=symbol,
                            amount=str(event.amount),
                            rate=str(event.rate),
                        )
                        self._remember(event)
                        self._emit(event)
        await self._flush()

    async def reconcile_all(self) -> None:
        """Make the book hold what the venue holds; every difference is a finding (DESIGN §4.2)."""
        snapshot = {k: v.quantity for k, v in (await self.gateway.positions()).items()}
        held = {k: ep.quantity for k, ep in self.book.exchange.items()}
        # Only symbols that differ in this snapshot are looked at again, under their lock.
        differing = {k.symbol for k in snapshot.keys() | held.keys() if snapshot.get(k) != held.get(k)}
        now = self.clock()
        for symbol in {k.symbol for k in snapshot.keys() | held.keys()} - differing:
            self._reconciled_at[symbol] = now
        for symbol in sorted(differing):
            async with self._symbol_locks[symbol]:  # no order of ours is in flight on it
                if self.journal.pending_on(symbol):
                    continue  # an order with an unknown outcome: look it up first
                await self._reconcile_symbol(symbol)
        await self._flush()

    async def _reconcile_symbol(self, symbol: str) -> None:
        market = self.gateway.market(symbol)
        if market is None:
            return
        now = self.clock()
        venue = {k: v for k, v in (await self.gateway.positions()).items() if k.symbol == symbol}
        held = {k: ep.quantity for k, ep in self.book.exchange.items() if k.symbol == symbol}
        if {k: v.quantity for k, v in venue.items()} == held:
            self._reconciled_at[symbol] = now
            return
        since = self._reconciled_at.get(symbol) or self._last_event_at or now - timedelta(days=1)
        # Venues keep a limited order history (Binance: 7 days); older is out of reach anyway.
        since = max(since - timedelta(seconds=60), now - ORDER_HISTORY_REACH)
        listed = await self.gateway.orders_since(symbol, since)
        stop_fills = await self.stops.fills(symbol, since) if self.stops is not None else set()
        external = [
            dataclasses.replace(o, protective_stop=True) if o.exchange_order_id in stop_fills else o
            for o in listed
            if o.exchange_order_id not in self._attributed_orders
        ]
        findings = reconcile(
            self.book,
            symbol,
            venue,
            external,
            market,
            self.settings.external_close_attribution,
            self.last_prices.get(symbol),
        )
        for finding in findings:
            metrics.RECONCILIATION_FINDINGS.labels(finding.kind.value).inc()
            log.warning(
                "reconcile.finding",
                kind=finding.kind.value,
                key=str(finding.key),
                book_quantity=str(finding.book_quantity),
                venue_quantity=str(finding.venue_quantity),
                slices=len(finding.settlements),
            )
            order_ids = sorted(finding.venue_order_ids)
            self._attributed_orders.update(order_ids)
            self._emit(
                PositionReconciled(
                    event_id=derive_id("position.reconciled", str(finding.key), now.isoformat(), *order_ids),
                    occurred_at=now,
                    kind=finding.kind.value,
                    symbol=finding.key.symbol,
                    side=finding.key.side,
                    book_quantity=finding.book_quantity,
                    venue_quantity=finding.venue_quantity,
                    strategy_position_ids=[
                        leg.position_id for intent, _ in finding.settlements for leg in intent.legs
                    ],
                    venue_order_ids=order_ids,
                )
            )
            for intent, fill in finding.settlements:
                self._book(intent, fill)
        self._reconciled_at[symbol] = now

    # --- signals -------------------------------------------------------------------------
    async def process_batch(self, msgs: list[Msg]) -> None:
        """Decide a batch, store its events, ack it: `run` does the same with the storing of
        one batch overlapping the deciding of the next."""
        started = time.perf_counter()
        await self.decide_batch(msgs)
        await self.store_and_ack(msgs, started)

    async def decide_batch(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await self.on_signal_message(msg)

    async def store_and_ack(self, msgs: list[Msg], started: float) -> None:
        await self._flush()
        if msgs:
            await msgs[-1].ack()  # AckPolicy.ALL: acknowledges the whole batch
        elapsed = time.perf_counter() - started
        log.debug("worker.batch", size=len(msgs), seconds=round(elapsed, 6))
        for _ in msgs:
            metrics.DECISION_LATENCY.observe(elapsed)

    async def on_signal_message(self, msg: Msg) -> None:
        """Decide one delivery. Nothing a publisher sends may stop the worker: whatever goes
        wrong before the signal is known is a dead letter, whatever goes wrong after it is an
        `internal_error` decision, and the batch is acked either way."""
        sequence = jetstream_sequences(msg)[0]
        try:
            parsed = parse_signal(
                msg.subject,
                msg.data,
                self.settings.max_signal_bytes,
                self.settings.default_notional is not None,
            )
        except Exception as exc:  # parse_signal contains every error it knows of; this is a bug
            log.exception("signal.parse_internal_error", subject=msg.subject)
            parsed = MalformedSignal("internal_error", (f"payload: {type(exc).__name__}",))
        if isinstance(parsed, MalformedSignal):
            self._emit(self._dead_letter(msg, parsed, sequence))
            return
        side = parsed.opening_side or parsed.position_side
        context = SIGNAL_CONTEXT.set(
            {
                "signal_id": parsed.signal_id,
                "strategy_id": parsed.strategy_id,
                "symbol": parsed.symbol,
                "side": side.value if side else None,
            }
        )
        try:
            async with self._symbol_locks[parsed.symbol]:
                try:
                    await self.on_signal(parsed, sequence)
                except Exception as exc:  # a bug must cost one signal, not the worker
                    log.exception("signal.internal_error")
                    self._decide(parsed, sequence, Outcome.REJECTED, "internal_error", repr(exc)[:500], ())
        finally:
            SIGNAL_CONTEXT.reset(context)

    async def on_signal(self, signal: Signal, sequence: int) -> None:
        if self.price_feed is not None:
            self._interest[signal.symbol] = time.monotonic()  # the feed watches it a while
        prior = self.ledger.decided_at(signal.strategy_id, signal.id)
        if prior is not False:
            if prior == sequence:
                metrics.REDELIVERED_SKIPPED.inc()
                log.info("signal.redelivered")  # its events are already stored
                return
            self._decide(
                signal,
                sequence,
                Outcome.DUPLICATE,
                "duplicate_signal_id",
                "signal_id was already decided; not executed again",
                (),
                event_id=derive_id("signal.duplicate", signal.strategy_id, signal.id, str(sequence)),
            )
            return
        if self.journal.pending and self.journal.awaiting(signal.strategy_id, signal.id):
            log.info("signal.awaiting_venue")  # the lookup of its order records its decision
            return
        if signal.opening_side is not None and self.ledger.was_opened(signal.strategy_id, signal.id):
            # A crash fell between the fill's events and the decision: finish the record.
            self._decide(
                signal,
                sequence,
                Outcome.ACCEPTED,
                "recovered",
                "executed before a restart; decision recorded now",
                (strategy_position_id_for(signal),),
            )
            return
        closed_before = (
            self.ledger.closed_for(signal.strategy_id, signal.id) if signal.action is Action.CLOSE else None
        )
        if closed_before is not None and signal.quantity is not None:
            # A close signal cut short by a crash: close what is left of it, no more.
            signal = signal.model_copy(update={"quantity": signal.quantity - closed_before})

        if self.journal.pending and not await self._resolve_symbol(signal.symbol):
            # The book may be wrong about this symbol until the venue tells us what happened.
            self._decide(
                signal,
                sequence,
                Outcome.REJECTED,
                "venue_uncertain",
                f"an earlier order on {signal.symbol} has an unknown outcome at the venue; "
                "nothing is placed on this symbol until it is looked up",
                (),
            )
            return

        now = self.clock()
        verdict = decide(
            signal,
            self.book,
            self.gateway.market(signal.symbol),
            (
                await self._trusted_price(signal.symbol)
                if self.gateway.quotes and signal.action is not Action.HOLD
                else self.last_prices.get(signal.symbol)
            ),
            now,
            self.rules,
            await self._available_balance() if signal.sized_by_balance else None,
            own_price_allowed=not self.gateway.quotes,
            risk=self.risk,
        )
        if not isinstance(verdict, Accepted):
            if closed_before is not None:  # nothing left to do: it all happened before a restart
                self._decide(
                    signal,
                    sequence,
                    Outcome.ACCEPTED,
                    "recovered",
                    "closed before a restart; decision recorded now",
                    (),
                )
                return
            self._decide(
                signal,
                sequence,
                verdict.outcome,
                verdict.reason_code,
                verdict.reason,
                (),
                limit=verdict.limit,
                figure=verdict.figure,
            )
            return
        if signal.opening_side is not None:
            self.risk.charge(signal.strategy_id, now)
        refused, done = await self._execute(signal, sequence, verdict)
        if refused is None:
            self._decide(
                signal, sequence, Outcome.ACCEPTED, "accepted", verdict.reason, verdict.strategy_position_ids
            )
            return
        if isinstance(refused, OrderUncertain) and self.journaled:
            # No decision yet: the journal holds the order and the signal's decision, and the
            # lookup that resolves the order records it (accepted if filled, else rejected).
            log.warning("signal.awaiting_venue", error=str(refused))
            return
        if isinstance(refused, OrderUncertain):  # the paper venue failed in a way it never should
            refused = OrderRejected("venue_error", str(refused))
        reason = str(refused)
        if done:
            # A hedge-mode reversal closes first, then opens: the closes stand, and the record
            # says so rather than pretending nothing happened.
            reason += f"; the {len(done)} opposite position(s) had already been closed (reversed)"
        self._decide(signal, sequence, Outcome.REJECTED, refused.reason_code, reason, tuple(done))

    async def _execute(
        self, signal: Signal, sequence: int, verdict: Accepted
    ) -> tuple[OrderRejected | OrderUncertain | None, list[str]]:
        """Place the verdict's orders in turn; stop at the first refusal or unknown outcome.
        Returns it and the strategy positions the orders placed before it closed."""
        done: list[str] = []
        for n, intent in enumerate(verdict.orders):
            pending = None
            if self.journaled:
                pending = PendingDecision(
                    strategy_id=signal.strategy_id,
                    signal_id=signal.id,
                    symbol=signal.symbol,
                    action=signal.action,
                    confidence=signal.confidence,
                    signal_sequence=sequence,
                    strategy_position_ids=list(verdict.strategy_position_ids),
                    closed_before=list(done),
                    reason=verdict.reason,
                    later_orders=len(verdict.orders) - n - 1,
                )
            outcome = await self._place(intent, pending)
            if outcome is not None:
                return outcome, done
            done.extend(leg.position_id for leg in intent.legs if isinstance(leg, CloseLeg))
        return None, done

    def _decide_after_lookup(self, submitted: OrderSubmitted, filled: bool) -> None:
        """Record the decision an unknown venue outcome held back, now that it is known."""
        pending = submitted.decision
        if pending is None or self.ledger.decided_at(pending.strategy_id, pending.signal_id) is not False:
            return
        if filled and not pending.later_orders:
            outcome, code, reason = Outcome.ACCEPTED, "accepted_after_lookup", pending.reason
            ids = pending.strategy_position_ids
        elif filled:
            outcome, code = Outcome.REJECTED, "partly_placed"
            reason = f"an order was filled after an unknown outcome; the {pending.later_orders} after it were not sent"
            ids = [*pending.closed_before, *(leg.position_id for leg in submitted.legs)]
        elif self._redelivered_from is not None and pending.signal_sequence >= self._redelivered_from:
            return  # its redelivery decides it afresh
        else:
            outcome, code, reason = Outcome.REJECTED, "not_placed", "the venue never placed the order"
            ids = pending.closed_before
        self._record_decision(
            pending.strategy_id,
            pending.signal_id,
            pending.symbol,
            pending.action,
            pending.confidence,
            pending.signal_sequence,
            outcome,
            code,
            reason,
            tuple(ids),
        )

    def _decide(
        self,
        signal: Signal,
        sequence: int,
        outcome: Outcome,
        reason_code: str,
        reason: str,
        position_ids: tuple[str, ...],
        event_id: str | None = None,
        limit: Decimal | None = None,
        figure: Decimal | None = None,
    ) -> None:
        self._record_decision(
            signal.strategy_id,
            signal.id,
            signal.symbol,
            signal.action,
            signal.confidence,
            sequence,
            outcome,
            reason_code,
            reason,
            position_ids,
            event_id,
            limit,
            figure,
        )

    def _record_decision(
        self,
        strategy_id: str,
        signal_id: str,
        symbol: str,
        action: Action,
        confidence: Decimal,
        sequence: int,
        outcome: Outcome,
        reason_code: str,
        reason: str,
        position_ids: tuple[str, ...],
        event_id: str | None = None,
        limit: Decimal | None = None,
        figure: Decimal | None = None,
    ) -> None:
        decided = SignalDecided(
            event_id=event_id or derive_id("signal.decided", strategy_id, signal_id),
            occurred_at=self.clock(),
            signal_id=signal_id,
            strategy_id=strategy_id,
            symbol=symbol,
            action=action,
            outcome=outcome,
            reason_code=reason_code,
            reason=reason,
            strategy_position_ids=list(position_ids),
            confidence=confidence,
            signal_sequence=sequence,
            limit=limit,
            figure=figure,
        )
        metrics.child(metrics.SIGNALS, outcome.value, reason_code).inc()
        log.info("signal.decided", outcome=outcome.value, reason_code=reason_code, reason=reason)
        self._remember(decided)
        self._emit(decided)

    def _dead_letter(self, msg: Msg, bad: MalformedSignal, sequence: int) -> SignalDead:
        metrics.DEAD_LETTERS.labels(bad.reason_code).inc()
        log.warning("signal.dead", subject=msg.subject, reason_code=bad.reason_code, errors=list(bad.errors))
        return dead_letter(msg.subject, msg.data, msg.headers, bad, sequence, self.clock())

    # --- prices and TP/SL ----------------------------------------------------------------
    async def on_price_message(self, msg: Msg) -> None:
        """Queue the tick for its symbol: a symbol whose order waits on the venue must not hold
        up the ticks (and the TP/SL) of every other symbol. Each symbol's ticks run in order."""
        tick = parse_tick(msg.subject, msg.data)
        if isinstance(tick, str):
            metrics.BAD_TICKS.inc()
            log.warning("price.invalid", subject=msg.subject, error=tick)
            return
        symbol, price = tick
        if self.gateway.market(symbol) is None:
            # Nothing can trade it here: no metric series, lock or queue for a made-up symbol.
            metrics.UNLISTED_TICKS.inc()
            return
        queue = self._ticks[symbol]
        runner = self._tick_runners.get(symbol)
        idle = runner is None or runner.done()  # a live runner may hold a tick taken off the queue
        if (
            idle
            and not queue
            and not self._symbol_locks[symbol].locked()
            and not self.book.triggers.may_fire(symbol, price)
        ):
            # Most ticks: nothing ahead of this one and no level reached; recording the price
            # needs no task and no lock.
            self._record_price(symbol, price)
            return
        if len(queue) >= TICK_BACKLOG_LIMIT:
            queue.popleft()  # a stalled symbol keeps its newest prices
            metrics.TICKS_DROPPED.inc()
        queue.append(price)
        if idle:
            self._tick_runners[symbol] = asyncio.create_task(self._run_ticks(symbol))

    async def _run_ticks(self, symbol: str) -> None:
        queue = self._ticks[symbol]
        while queue:
            try:
                await self.on_price(symbol, queue.popleft())
            except Exception:  # a bug must cost one tick, not the symbol's price feed
                log.exception("price.internal_error", symbol=symbol)

    def _record_price(self, symbol: str, price: Decimal) -> None:
        metrics.PRICE_TICKS.inc()
        metrics.child(metrics.LAST_TICK, symbol).set(time.time())
        self.last_prices[symbol] = price
        now = self._price_seen_at[symbol] = time.monotonic()
        self.gateway.on_price(symbol, price)
        if self._price_store is not None and self._price_store.due(symbol, now):
            self._in_background(self._price_store.write(symbol, price, time.time()))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Work nobody waits for (a failure is logged, never raised)."""

        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                log.warning("worker.background_failed", error=repr(exc)[:300])

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restore_prices(self) -> None:
        """The last price of every symbol as the previous process left it, with its age: a
        reference for pre-trade checks at once (a stale one is replaced by the venue's mark);
        never a trigger for TP/SL, which wait for a new tick."""
        try:
            self._price_store = await LastPrices.open(self.bus.js)
            stored = await self._price_store.read_all()
        except Exception as exc:
            log.warning("prices.restore_failed", error=repr(exc)[:300])
            return
        now = time.monotonic()
        for symbol, (price, age) in stored.items():
            if symbol not in self.last_prices and self.gateway.market(symbol) is not None:
                self.last_prices[symbol] = price
                self._price_seen_at[symbol] = now - age
                self.gateway.on_price(symbol, price)
        log.info("prices.restored", symbols=len(stored))

    async def _start_stops(self) -> None:
        mode = self.settings.protective_stops
        if mode is Switch.OFF or (mode is Switch.AUTO and not self.gateway.quotes):
            return
        self.stops = ProtectiveStops(
            self.gateway, lambda: self.book, self._symbol_locks.__getitem__, self.settings.protective_stop_pct
        )
        try:
            await self.stops.load()
        except Exception as exc:  # the venue may be away: the keeper retries on its own
            log.warning("stops.load_failed", error=repr(exc)[:300])

    def _feed_symbols(self) -> set[str]:
        """Open positions' symbols and those with a signal in the last PRICE_INTEREST_SECONDS."""
        horizon = time.monotonic() - self.settings.price_interest_seconds
        for symbol in [s for s, at in self._interest.items() if at < horizon]:
            del self._interest[symbol]
        return {key.symbol for key in self.book.exchange} | set(self._interest)

    def _start_price_feed(self) -> asyncio.Task[None] | None:
        mode = self.settings.price_feed
        if mode is PriceFeedMode.OFF or (mode is PriceFeedMode.AUTO and not self.gateway.quotes):
            return None
        if not self.gateway.quotes:
            log.warning(
                "price_feed.unavailable", venue=self.gateway.name, why="the venue has no prices of its own"
            )
            return None
        kind = self.settings.tpsl_price.value
        streaming = mode is PriceFeedMode.STREAM

        async def source(symbols: list[str]) -> dict[str, Decimal]:
            if streaming:
                return await self.gateway.watch_prices(symbols, kind)
            return await self.gateway.venue_prices(symbols, kind)

        async def publish(subject: str, payload: bytes) -> None:
            await self.bus.nc.publish(subject, payload)

        every = 0.0 if streaming else self.settings.price_poll_seconds
        self.price_feed = PriceFeed(source, publish, self._feed_symbols, every, f"{self.gateway.name}:{kind}")
        log.info("price_feed.started", source=self.price_feed.name, mode=mode.value, every=every)
        return asyncio.create_task(self.price_feed.run(self._stopping))

    async def _available_balance(self) -> Decimal | None:
        """The account's available balance, asked only for a signal sized by it."""
        try:
            return await self.gateway.available_balance()
        except Exception as exc:
            log.warning("venue.balance_failed", error=repr(exc)[:300])
            return None

    async def _trusted_price(self, symbol: str) -> Decimal | None:
        """On a venue that quotes, the price pre-trade checks use: the last tick while it is
        fresh, else the venue's own (mark) price; None when the venue gives neither. (A venue
        without prices of its own, paper, has only the ticks it was given, however old.)"""
        last = self.last_prices.get(symbol)
        seen = self._price_seen_at.get(symbol)
        if (
            last is not None
            and seen is not None
            and time.monotonic() - seen <= self.settings.price_max_age_seconds
        ):
            return last
        try:
            quoted = await self.gateway.reference_price(symbol)
        except Exception as exc:
            log.warning("price.reference_failed", symbol=symbol, error=repr(exc)[:300])
            quoted = None
        if quoted is None:
            # The venue gives none: a tick of the last few minutes still stands in; an older
            # one (a price restored from days ago) must not size an order or pass a limit.
            recent = seen is not None and time.monotonic() - seen <= STALE_PRICE_LIMIT
            return last if recent else None
        self.last_prices[symbol] = quoted
        self._price_seen_at[symbol] = time.monotonic()
        return quoted

    async def on_price(self, symbol: str, price: Decimal) -> None:
        async with self._symbol_locks[symbol]:
            self._record_price(symbol, price)
            fired = self.book.fire_triggers(symbol, price)
            # A slice whose close has an unknown outcome is left to its lookup, not the price.
            closing = [
                (sp, sp.remaining, reason) for sp, reason in fired if sp.id not in self.journal.closing
            ]
            market = self.gateway.market(symbol)
            max_quantity = market.max_quantity if market else None
            for intent in closes_by_key(closing, price, None, max_quantity) if closing else ():
                await self._close_fired(intent, price)
        if fired:
            self._flush_soon()  # nothing waits on these: let ticks in a burst share one flush

    async def _close_fired(self, intent: OrderIntent, price: Decimal) -> None:
        """Close the slices a tick reached (its lock held). If the venue refuses them together,
        each goes on its own: one slice it will not close must not keep the others open."""
        outcome = await self._place(intent)
        if isinstance(outcome, OrderRejected):
            log.warning("trigger.close_refused", client_order_id=intent.client_order_id, error=str(outcome))
            self._wake_reconcile.set()  # the venue may have closed it already (a protective stop)
            if len(intent.legs) > 1:
                for leg in intent.legs:
                    sp = self.book.positions.get(StrategyPositionId(leg.position_id))
                    if sp is not None and isinstance(leg, CloseLeg):
                        await self._close_fired(
                            close_intent(sp, sp.remaining, leg.reason, price, None), price
                        )
                return
        if not isinstance(outcome, OrderUncertain):
            self._rearm_still_open(intent)  # refused, or partly filled: TP/SL stay on the rest
        # An uncertain close stays disarmed until its lookup says it was never placed.

    # --- events --------------------------------------------------------------------------
    def _remember(self, event: Event, replay: bool = False) -> None:
        """Fold an event into the ledger (and, on replay, the book); count it once."""
        if replay:
            self._last_event_at = event.occurred_at
        match event:
            case SignalDecided():
                self.ledger.apply(event)
            case PositionOpened():
                self._slice_history.record(event, self._started_at if replay else event.occurred_at)
                if replay and event.strategy_position_id not in self._replayed_opens:
                    self._replayed_opens.add(event.strategy_position_id)
                    self.book.apply(event)  # a re-stored open of a slice closed since is not reopened
                    self._replayed_cash -= event.fee
                    self.risk.book(event.strategy_id, event.occurred_at, -event.fee)
                self.ledger.apply(event)
                self.journal.apply(event)
                if event.strategy_id == EXTERNAL_STRATEGY:
                    self._attributed_orders.update(event.exchange_order_id.split(","))
                if not replay:
                    self.risk.book(event.strategy_id, event.occurred_at, -event.fee)
                    if self.stops is not None:
                        self.stops.touch(PositionKey(event.symbol, event.side))
                    metrics.child(metrics.STRATEGY_POSITIONS_OPENED, event.strategy_id).inc()
                    if event.exchange_position.quantity_before == 0:
                        metrics.child(metrics.EXCHANGE_POSITIONS_OPENED, event.side.value).inc()
            case PositionClosed():
                self._slice_history.record(event, self._started_at if replay else event.occurred_at)
                if replay:
                    closing = self.book.positions.get(StrategyPositionId(event.strategy_position_id))
                    if closing is not None and event.event_id == self.book.next_close_event_id(closing):
                        self.risk.book(event.strategy_id, event.occurred_at, event.gross_pnl - event.exit_fee)
                    self.book.apply(event)
                    self._replayed_cash += event.gross_pnl - event.exit_fee
                self.ledger.apply(event)
                self.journal.apply(event)
                if not replay:
                    self.risk.book(event.strategy_id, event.occurred_at, event.gross_pnl - event.exit_fee)
                if event.close_reason in (CloseReason.MANUAL, CloseReason.LIQUIDATION):
                    self._attributed_orders.update(event.exchange_order_id.split(","))
                if not replay:
                    if self.stops is not None:
                        self.stops.touch(PositionKey(event.symbol, event.side))
                    metrics.child(
                        metrics.STRATEGY_POSITIONS_CLOSED, event.strategy_id, event.close_reason.value
                    ).inc()
                    if event.realized_pnl >= 0:
                        metrics.child(metrics.REALIZED_PNL, event.strategy_id).inc(float(event.realized_pnl))
                    else:
                        metrics.child(metrics.REALIZED_LOSS, event.strategy_id).inc(
                            float(-event.realized_pnl)
                        )
                        self._halt_on_losses((event.strategy_id,))
            case OrderSubmitted() | OrderSettled() | OrderFailed():
                if replay:
                    self.journal.apply(event)
            case PositionReconciled():
                self._attributed_orders.update(event.venue_order_ids)
            case PositionFunding():
                # A payment counts as booked once all its parts are stored: a crash in the middle
                # of storing them leaves it to the next round, which books the missing parts.
                seen = self._funding_parts.setdefault(event.venue_ref, set())
                seen.add(event.event_id)
                if len(seen) >= event.parts:
                    del self._funding_parts[event.venue_ref]
                    self._funding_refs.update(event.venue_ref.split("+"))
                    booked = self._funded_through.get(event.symbol)
                    if booked is None or event.funding_time > booked:
                        self._funded_through[event.symbol] = event.funding_time
                self.risk.book(event.strategy_id, event.occurred_at, event.amount)
                if replay:
                    self._replayed_cash += event.amount
                else:
                    metrics.child(metrics.FUNDING, event.strategy_id).inc(float(event.amount))
                    if event.amount < 0:
                        self._halt_on_losses((event.strategy_id,))
            case ControlApplied():
                if replay:
                    restore_halts(self.risk, event)
            case SignalDead():
                pass

    def _halt_on_losses(self, strategies: Iterable[str]) -> None:
        """Halt a strategy (or the account) whose loss of the day reached its limit; recorded
        as an event, so `tradeengine status` shows it and a restart keeps it."""
        if not self.risk.limits.watches_daily_loss:
            return
        now = self.clock()
        for halt in self.risk.losses_past_limit(strategies, now):
            self.risk.halt(halt)
            log.error("risk.daily_loss_halt", scope=str(halt.scope), reason=halt.reason)
            self._emit(
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

    async def flatten(self, scope: Scope) -> list[str]:
        """Close every open slice in the scope at market, reason `manual`: one order per key
        (split at the venue's size limit), under each symbol's lock. Returns the slices closed."""
        closed: list[str] = []
        # Passes until the scope holds nothing more to close: a signal that passed its checks
        # before the halt may open a position (under its symbol's lock) while a pass runs.
        for _ in range(FLATTEN_PASSES):
            closed_before = len(closed)
            symbols = sorted(
                {sp.symbol for sp in self.book.positions.values() if scope.covers(sp.strategy_id, sp.symbol)}
            )
            for symbol in symbols:
                closed += await self._flatten_symbol(scope, symbol)
            if len(closed) == closed_before:
                break
        return closed

    async def _flatten_symbol(self, scope: Scope, symbol: str) -> list[str]:
        async with self._symbol_locks[symbol]:
            closing = [
                (sp, sp.remaining, CloseReason.MANUAL)
                for sp in list(self.book.positions.values())
                if sp.symbol == symbol
                and scope.covers(sp.strategy_id, symbol)
                and sp.id not in self.journal.closing
            ]
            if not closing:
                return []
            price = (
                await self._trusted_price(symbol) if self.gateway.quotes else self.last_prices.get(symbol)
            ) or closing[0][0].entry_price  # the paper venue before any tick: no better price
            market = self.gateway.market(symbol)
            for intent in closes_by_key(closing, price, None, market.max_quantity if market else None):
                await self._close_fired(intent, price)
            return [sp.id for sp, _, _ in closing if sp.id not in self.book.positions]

    def _emit(self, event: Event) -> None:
        self._outbox.append(event)

    def _flush_soon(self) -> None:
        if self._background_flush is None or self._background_flush.done():
            self._background_flush = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        """Store every pending event; on failure keep them and retry: nothing is dropped.

        Only a stop request ends the retries (after a last 30 s): the signals behind the
        unpublished events are not acked, so the next start redelivers them, and the book that
        start replays never saw these events, so nothing is counted twice."""
        async with self._flush_lock:  # one flusher: retries keep stream order, acks wait for storage
            self._check_lease()
            if self._abandoned_events:
                # Events were dropped on the way out: nothing after them may count as stored
                # (no ack, no order sent on the strength of a journal entry).
                raise RuntimeError("events were abandoned while stopping; nothing more is stored")
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        delay, give_up_at = 0.05, None
        while self._outbox:
            self._check_lease()  # every attempt: a retry may outlast the lease
            pending, self._outbox = self._outbox, []
            try:
                await self.bus.publish_events(pending)
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
                if self._stopping.is_set():
                    give_up_at = give_up_at or time.monotonic() + 30
                    if time.monotonic() > give_up_at:
                        log.error("events.abandoned_on_stop", pending=len(self._outbox))
                        self._abandoned_events = True
                        self._outbox.clear()
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
