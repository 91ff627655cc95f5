"""A worker process over several signal partitions (SIGNAL_PARTITIONS > 1, issue #16).

Each partition is run by one `Worker` at a time (a lane: its own durable, state, snapshots and
crash-loop breaker, its symbols only), under a lease in the KV bucket `tradeengine_partitions`.
Every process renews its entry in `tradeengine_members` and, each quarter of
PARTITION_LEASE_SECONDS, applies `engine.domain.partitions.plan` to what it sees: it takes free
partitions up to its fair share and gives one back while it holds more. A process that dies
stops renewing; its leases and its membership expire within PARTITION_LEASE_SECONDS (at once
when another process on the same host sees its pid gone), and the others take its partitions.
A lane that cannot renew in time fences itself before anyone else can take its lease (the lease
is checked before each order and each store), and its orders' client ids are derived from the
signal, so an order sent late by it is a duplicate at the venue, not a second fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import structlog
from nats.js.kv import KeyValue

from engine import metrics
from engine.adapters.gateway import ExchangeGateway
from engine.adapters.leases import (
    MEMBERS_BUCKET,
    NO_ENTRY,
    PARTITIONS_BUCKET,
    Holder,
    Lease,
    LeaseLost,
    LeaseTaken,
    bucket_keys,
    open_bucket,
)
from engine.adapters.nats_bus import NatsBus
from engine.app.layout import check_layout, claim_layout, member_prefix
from engine.app.worker import Worker
from engine.config import ConfigError, Settings
from engine.domain.partitions import fair_share, lane_name, partition_of, plan

log = structlog.get_logger(__name__)
STARTUP_PATIENCE = 90.0  # seconds a start-up step against NATS is tried again
T = TypeVar("T")


@dataclass
class Lane:
    partition: int
    worker: Worker
    task: asyncio.Task[None]


class PartitionedWorker:
    def __init__(
        self,
        settings: Settings,
        bus: NatsBus,
        lane_venue: Callable[[Callable[[str], bool]], ExchangeGateway],
        start_venue: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings, self.bus = settings, bus
        self.lane_venue, self.start_venue = lane_venue, start_venue
        self.partitions = settings.signal_partitions
        self.seconds = settings.partition_lease_seconds
        self.holder = Holder.this_process()
        self.lanes: dict[int, Lane] = {}
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.member_key = member_prefix(settings.worker_durable, self.partitions) + self.holder.instance
        self._members: KeyValue | None = None
        self._leases: KeyValue | None = None
        self._free_since: dict[int, float] = {}  # partitions seen unheld, since when (monotonic)

    @property
    def every(self) -> float:
        return self.seconds / 4

    def stop(self) -> None:
        self.stopping.set()
        for lane in self.lanes.values():
            lane.worker.stop()

    async def run(self) -> None:
        js, replicas = self.bus.js, self.bus.replicas
        await self._patiently(lambda: claim_layout(self.bus, self.settings), "the streams")
        await self.start_venue()
        self._members = await self._patiently(
            lambda: open_bucket(js, MEMBERS_BUCKET, self.seconds, replicas), MEMBERS_BUCKET
        )
        self._leases = await self._patiently(
            lambda: open_bucket(js, PARTITIONS_BUCKET, self.seconds, replicas), PARTITIONS_BUCKET
        )
        metrics.OPEN_STRATEGY_POSITIONS.set_function(
            lambda: sum(len(lane.worker.book.positions) for lane in self.lanes.values())
        )
        metrics.SIGNAL_PARTITIONS.set(self.partitions)
        metrics.PARTITIONS_HELD.set_function(lambda: len(self.lanes))
        log.info(
            "partitions.joining",
            partitions=self.partitions,
            holder=self.holder.describe(),
            lease_seconds=self.seconds,
        )
        try:
            await self._heartbeat()
            # Peers starting now register within a round: wait one, so the first claims are shared.
            await self._pause(self.every)
            while not self.stopping.is_set():
                await self._round()
                if all(lane.worker.ready.is_set() for lane in self.lanes.values()):
                    self.ready.set()
                await self._pause(self.every)
        finally:
            self.ready.clear()
            for lane in self.lanes.values():
                lane.worker.stop()
            ended = await asyncio.gather(*(lane.task for lane in self.lanes.values()), return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._members.delete(self.member_key)
            log.info("partitions.left", held=sorted(self.lanes))
            for outcome in ended:
                if isinstance(outcome, ConfigError):
                    raise outcome

    async def _patiently(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        """A start-up step against NATS, tried again while a cluster elects new leaders (a node
        lost: timeouts and refusals for tens of seconds); a configuration error stops at once."""
        deadline, delay = time.monotonic() + STARTUP_PATIENCE, 0.5
        while True:
            try:
                return await step()
            except ConfigError:
                raise
            except (nats.errors.Error, TimeoutError) as exc:
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise
                log.warning("partitions.start_retry", step=what, error=repr(exc)[:200])
                await self._pause(delay)
                delay = min(delay * 2, 5.0)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _heartbeat(self) -> None:
        assert self._members is not None
        try:
            await self._members.put(self.member_key, self.holder.encode())
        except Exception as exc:  # NATS away: the leases fence themselves if it lasts
            log.warning("partitions.heartbeat_failed", error=repr(exc)[:200])

    async def _round(self) -> None:
        await self._heartbeat()
        for partition, lane in list(self.lanes.items()):
            if lane.task.done():
                del self.lanes[partition]
                failure = lane.task.exception()
                if isinstance(failure, ConfigError):
                    raise failure  # this process is not configured for the desk: it stops (exit 2)
                if failure is not None and not isinstance(failure, LeaseLost):
                    # Its lease is given back (or expires); whoever takes it next starts it
                    # afresh from its events, and a message that keeps killing it is set aside
                    # by the crash-loop breaker, counted per partition. The others run on.
                    log.error("partitions.lane_failed", partition=partition, error=repr(failure)[:500])
                else:
                    log.info("partitions.lane_ended", partition=partition)
        try:
            alive, (taken, holding) = await self._live_members(), await self._taken()
        except Exception as exc:
            log.warning("partitions.view_failed", error=repr(exc)[:200])
            return
        if any(lane.worker.stopping.is_set() for lane in self.lanes.values()):
            return  # one partition moves at a time: wait for the one being given back
        now, share = time.monotonic(), fair_share(self.partitions, len(alive))
        free = set(range(self.partitions)) - taken - set(self.lanes)
        self._free_since = {p: self._free_since.get(p, now) for p in free}
        overdue = frozenset(p for p, since in self._free_since.items() if now - since > self.seconds)
        step = plan(
            self.partitions,
            frozenset(self.lanes),
            taken,
            len(alive),
            zlib.crc32(self.holder.instance.encode()),
            overdue,
            hungry=any(holding.get(other, 0) < share for other in alive - {self.holder.instance}),
        )
        for partition in step.release:
            log.info(
                "partitions.releasing", partition=partition, members=len(alive), why="above the fair share"
            )
            self.lanes[partition].worker.stop()
        for partition in step.take:
            await self._take(partition)

    async def _live_members(self) -> set[str]:
        """The instances of the live workers of this desk and layout (this one included)."""
        assert self._members is not None
        alive = {self.holder.instance}
        prefix = member_prefix(self.settings.worker_durable, self.partitions)
        for key in await bucket_keys(self.bus.js, MEMBERS_BUCKET):
            if not key.startswith(prefix):
                continue
            with contextlib.suppress(*NO_ENTRY):
                holder = Holder.decode((await self._members.get(key)).value)
                if holder is not None and not holder.gone():
                    alive.add(holder.instance)
        return alive

    async def _taken(self) -> tuple[frozenset[int], dict[str, int]]:
        """Partitions whose lease another live process holds, and how many each instance holds."""
        assert self._leases is not None
        prefix = lane_name(self.settings.worker_durable, 0)[:-1]
        taken: set[int] = set()
        holding: dict[str, int] = {}
        for key in await bucket_keys(self.bus.js, PARTITIONS_BUCKET):
            if not key.startswith(prefix) or not key[len(prefix) :].isdigit():
                continue
            partition = int(key[len(prefix) :])
            if partition in self.lanes or partition >= self.partitions:
                continue
            with contextlib.suppress(*NO_ENTRY):
                holder = Holder.decode((await self._leases.get(key)).value)
                if holder is None or not holder.gone():  # a dead holder's lease is taken over
                    taken.add(partition)
                    if holder is not None:
                        holding[holder.instance] = holding.get(holder.instance, 0) + 1
        return frozenset(taken), holding

    async def _take(self, partition: int) -> None:
        name = lane_name(self.settings.worker_durable, partition)
        lease = Lease(self.bus.js, name, self.seconds, self.bus.replicas, PARTITIONS_BUCKET, self.holder)
        try:
            if not await lease.acquire(False, self.stopping, lambda _: None):
                return
        except LeaseTaken:
            return  # another process was quicker
        except Exception as exc:
            log.warning("partitions.take_failed", partition=partition, error=repr(exc)[:200])
            return
        try:
            await check_layout(self.bus, self.settings)  # a standby of an old layout must not run
        except BaseException:
            await lease.release()
            raise
        if self.stopping.is_set():
            await lease.release()
            return

        def owns(symbol: str) -> bool:
            return partition_of(symbol, self.partitions) == partition

        worker = Worker(self.settings, self.bus, self.lane_venue(owns), partition=partition)
        task = asyncio.create_task(worker.run(lease), name=f"partition-{partition}")
        self.lanes[partition] = Lane(partition, worker, task)
        log.info("partitions.taken", partition=partition, held=sorted(self.lanes))

    async def checks(self) -> dict[str, bool]:
        return {
            "worker_partitions": self.ready.is_set()
            and all(lane.worker.ready.is_set() for lane in self.lanes.values())
        }

    def details(self) -> dict[str, Any]:
        found: dict[str, Any] = {"partitions_held": sorted(self.lanes)}
        for lane in self.lanes.values():
            for key, value in lane.worker.details().items():
                found.setdefault(key, value)
        return found
