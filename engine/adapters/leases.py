"""Who may run a durable consumer, and how often a start died on the same message, kept in
NATS KV (JetStream key-value buckets; the 2.9 server has them).

- `Lease`: one live holder per durable. Two workers on one durable would each place the
  other's orders; the second one waits as a standby (or refuses) instead, and takes over
  when the holder stops renewing. Renewals are revision-checked updates, so a holder that was
  replaced finds out on its next renewal instead of writing over the new holder.
- `StartRecord`: the crash-loop breaker's memory. Re-creating a consumer at its ack floor
  (how a restart gets its unacked messages back at once and in order) resets the server's
  delivery count, so the server's MAX_DELIVER cannot see a message that kills every process
  that reads it. This record can: it counts the starts that found the same ack floor with
  messages in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

log = structlog.get_logger(__name__)

LEASE_BUCKET = "tradeengine_leases"
PARTITIONS_BUCKET = "tradeengine_partitions"  # one lease a signal partition (SIGNAL_PARTITIONS > 1)
MEMBERS_BUCKET = "tradeengine_members"  # the partitioned workers alive now, each renewing its entry
STARTS_BUCKET = "tradeengine_starts"
STARTS_KEEP = 7 * 86_400.0  # seconds a start record is kept
# A key never written, and one deleted (a released lease): nats-py raises one or the other.
NO_ENTRY = (KeyNotFoundError, KeyDeletedError)


@dataclass(frozen=True, slots=True)
class Holder:
    """A process, told apart from a later one with the same pid (pids are reused, and in a
    container the worker is often pid 1 every time)."""

    instance: str
    host: str
    pid: int
    started: str  # the process's start time in clock ticks since boot ("" where unknown)
    since: str
    renewed: float = 0.0  # Unix time of the write that holds this value (each renewal writes one)
    # The kernel boot and pid namespace the pid is read in: only where both are ours can this
    # host tell from /proc whether the holder still runs (two containers may share a host
    # name, and each may run the worker as pid 1).
    machine: str = ""

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            instance=uuid.uuid4().hex[:12],
            host=socket.gethostname(),
            pid=os.getpid(),
            started=_start_ticks(os.getpid()),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
            machine=_machine(),
        )

    def encode(self) -> bytes:
        """As written now: `renewed` is the time of this write."""
        return json.dumps(asdict(self) | {"renewed": time.time()}).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Holder | None:
        try:
            fields = json.loads(data or b"")
            return cls(
                **{k: fields[k] for k in ("instance", "host", "pid", "started", "since")},
                renewed=float(fields.get("renewed", 0.0)),
                machine=str(fields.get("machine", "")),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def gone(self) -> bool:
        """True only when this process can see that the holder process no longer runs: same
        kernel boot and pid namespace, and its pid is not the same process any more."""
        if not self.machine or self.machine != _machine() or not self.started:
            return False
        return _start_ticks(self.pid) != self.started

    def describe(self) -> str:
        return f"instance {self.instance} (pid {self.pid} on {self.host}, since {self.since})"


def _machine() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


class LeaseLost(RuntimeError):
    """Another process holds the lease now: this one must stop acting for the durable."""


class LeaseTaken(RuntimeError):
    """The lease is held by a live process and this one was told not to wait."""


async def with_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """A bucket's stream (KV_<name>, OBJ_<name>) made before STREAM_REPLICAS changed gets the
    new count: losing a node must not lose a lease or a snapshot."""
    with contextlib.suppress(Exception):  # a server that cannot (one node): left as it is
        config = (await js.stream_info(stream)).config
        if (config.num_replicas or 1) != replicas:
            config.num_replicas = replicas
            await js.update_stream(config)


async def open_bucket(js: JetStreamContext, name: str, ttl: float | None, replicas: int = 1) -> KeyValue:
    """The KV bucket `name`, created (with entries expiring after `ttl` seconds, on `replicas`
    servers of a cluster) if missing."""
    try:
        found = await js.key_value(name)
        if replicas > 1:
            await with_replicas(js, f"KV_{name}", replicas)
        return found
    except (NotFoundError, Exception):
        with contextlib.suppress(Exception):  # another process may have created it meanwhile
            return await js.create_key_value(
                KeyValueConfig(bucket=name, history=1, ttl=ttl, storage=StorageType.FILE, replicas=replicas)
            )
        return await js.key_value(name)


class Lease:
    """The lease on one name (a durable), held by this process while it renews it."""

    def __init__(
        self,
        js: JetStreamContext,
        name: str,
        seconds: float,
        replicas: int = 1,
        bucket: str = LEASE_BUCKET,
        holder: Holder | None = None,
    ) -> None:
        self.js, self.name, self.seconds, self.replicas, self.bucket = js, name, seconds, replicas, bucket
        self.holder = holder or Holder.this_process()
        self.revision: int | None = None
        self._kv: KeyValue | None = None
        self._renewed_at = 0.0

    @property
    def held(self) -> bool:
        return self.revision is not None

    @property
    def renew_every(self) -> float:
        return self.seconds / 4

    def confirmed(self) -> bool:
        """Held, and renewed recently enough that nobody else can have taken it over: the
        entry expires `seconds` after our last renewal, and a standby only takes it then.
        Past this, the holder must stop acting before it knows more."""
        return self.revision is not None and time.monotonic() - self._renewed_at < 0.8 * self.seconds

    async def acquire(
        self, wait: bool, stopping: asyncio.Event, on_standby: Callable[[Holder | None], None]
    ) -> bool:
        """Take the lease; while someone else holds it, wait as a standby (or raise
        LeaseTaken). False if `stopping` was set before the lease came free."""
        # A holder that stopped renewing is gone from the bucket after its TTL, which whoever
        # created the bucket chose: renew (and trust the lease) by the shorter of the two.
        self._kv = await open_bucket(self.js, self.bucket, self.seconds, self.replicas)
        with contextlib.suppress(Exception):
            ttl = (await self._kv.status()).ttl
            if ttl and ttl < self.seconds:
                log.warning(
                    "lease.bucket_ttl_shorter", lease=self.name, configured=self.seconds, bucket_ttl=ttl
                )
                self.seconds = ttl
        told: str | None = None
        while not stopping.is_set():
            other = await self._try_take()
            if other is None:
                log.info("lease.acquired", lease=self.name, holder=self.holder.describe())
                return True
            if not wait:
                raise LeaseTaken(f"durable {self.name!r} is in use by {other.describe()}")
            if told != other.instance:
                told = other.instance
                log.warning(
                    "lease.standby",
                    lease=self.name,
                    held_by=other.describe(),
                    why="another worker runs this durable; this one waits and takes over "
                    f"if that one stops renewing for {self.seconds:g}s",
                )
                on_standby(other)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), min(1.0, self.renew_every))
        return False

    async def _try_take(self) -> Holder | None:
        """None once the lease is ours; else its live holder."""
        kv = self._kv
        assert kv is not None
        for _ in range(3):  # the holder's entry may expire, or be taken, between two requests
            if await self._write(kv.create(self.name, self.holder.encode())):
                return None
            try:
                entry = await kv.get(self.name)
            except NO_ENTRY:
                continue
            other = Holder.decode(entry.value)
            if other is not None and other.instance == self.holder.instance:
                self.revision = entry.revision
                return None
            if other is not None and not other.gone():
                return other
            # Its process is dead (seen from this host) or the value is not a lease: take it,
            # revision-checked, so of two processes doing this at once only one wins.
            log.info("lease.taking_over", lease=self.name, from_holder=other.describe() if other else None)
            if await self._write(kv.update(self.name, self.holder.encode(), last=entry.revision)):
                return None
        return Holder("unknown", "unknown", 0, "", "")  # contended: the next attempt reads it again

    async def _write(self, request: Awaitable[int]) -> bool:
        """Whether a revision-checked write of our lease went through."""
        sent_at = time.monotonic()
        try:
            self.revision = await request
        except KeyWrongLastSequenceError:
            return False
        self._renewed_at = sent_at
        return True

    async def renew(self) -> None:
        """Raise LeaseLost if someone else holds it now; other errors (NATS away) pass up
        and the next renewal tries again."""
        assert self._kv is not None and self.revision is not None
        sent_at = time.monotonic()  # the entry lives `seconds` from this write, at the latest
        try:
            self.revision = await self._kv.update(self.name, self.holder.encode(), last=self.revision)
        except KeyWrongLastSequenceError:
            # Our own earlier write may have gone through after its answer was given up on.
            try:
                entry = await self._kv.get(self.name)
            except NO_ENTRY:  # expired, or released: not ours any more either way
                self.revision = None
                raise LeaseLost(f"the lease on {self.name!r} expired") from None
            holder = Holder.decode(entry.value)
            if holder is None or holder.instance != self.holder.instance:
                self.revision = None
                raise LeaseLost(f"the lease on {self.name!r} was taken over") from None
            self.revision = entry.revision
            return
        self._renewed_at = sent_at

    async def keep(self, stopping: asyncio.Event) -> None:
        """Renew every quarter of the lease until stopped; raises LeaseLost when someone else
        holds it, or when it could not be renewed for long enough that someone could."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.renew_every)
            if stopping.is_set():
                return
            try:
                await asyncio.wait_for(self.renew(), self.renew_every)
            except LeaseLost:
                raise
            except Exception as exc:
                log.warning(
                    "lease.renew_failed",
                    lease=self.name,
                    error=repr(exc),
                    unrenewed_seconds=round(time.monotonic() - self._renewed_at, 1),
                )
            if not self.confirmed():
                self.revision = None
                raise LeaseLost(
                    f"the lease on {self.name!r} could not be renewed for "
                    f"{time.monotonic() - self._renewed_at:.1f}s; another worker may hold it now"
                )

    async def release(self) -> None:
        if self._kv is None or self.revision is None:
            return
        with contextlib.suppress(Exception):
            await self._kv.delete(self.name, last=self.revision)
        self.revision = None


@dataclass(frozen=True, slots=True)
class StartCount:
    floor: int
    starts: int


async def count_start(js: JetStreamContext, durable: str, floor: int, replicas: int = 1) -> int:
    """How many starts in a row found `durable` at this ack floor with messages in flight
    (this one included)."""
    kv = await open_bucket(js, STARTS_BUCKET, STARTS_KEEP, replicas)
    starts = 1
    with contextlib.suppress(*NO_ENTRY):
        last = _decode_start((await kv.get(durable)).value)
        if last is not None and last.floor == floor:
            starts = last.starts + 1
    await _write_start(kv, durable, floor, starts)
    return starts


async def carry_start_count(
    js: JetStreamContext, durable: str, floor: int, starts: int, replicas: int = 1
) -> None:
    """Record `starts` at `floor`. A careful start moves the count along with the ack floor
    past a message that did not kill it, so the next start that dies on the next message adds
    to it."""
    await _write_start(await open_bucket(js, STARTS_BUCKET, STARTS_KEEP, replicas), durable, floor, starts)


async def _write_start(kv: KeyValue, durable: str, floor: int, starts: int) -> None:
    await kv.put(durable, json.dumps(asdict(StartCount(floor, starts))).encode())


def _decode_start(data: bytes | None) -> StartCount | None:
    try:
        fields: dict[str, Any] = json.loads(data or b"")
        return StartCount(int(fields["floor"]), int(fields["starts"]))
    except (ValueError, TypeError, KeyError):
        return None


async def bucket_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """The keys a KV bucket holds an entry for (deleted ones too; a get tells), from one stream
    info request: `kv.keys()` creates a consumer a time, which a cluster that has just lost a
    node refused or timed out for a minute in tests/integration/test_partitions.py."""
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
    prefix = f"$KV.{bucket}."
    return [subject[len(prefix) :] for subject in info.state.subjects or {}]
