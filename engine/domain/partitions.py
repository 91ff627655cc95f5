"""Signals spread over partitions by symbol, and who runs which partition (issue #16).

A symbol's partition is the nats-server's own `partition(n, token)` of its subject token: the
32-bit FNV-1a hash of the token, modulo n. The SIGNALS stream maps `signals.<strategy>.<symbol>`
to `signals.<strategy>.<symbol>.<partition>` with that function (a stream subject transform), so
one symbol's signals stay in order in one partition whoever publishes them; a test checks this
function against a real server.

Which worker runs which partition is decided by leases in NATS KV; `plan` is the pure rule each
worker applies to what it sees: hold a fair share, take free partitions up to it, give back one
above it. Nothing moves that need not: a worker keeps what it holds unless it holds more than its
share, and a newcomer gets only what others give back or what a dead worker left.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=16_384)  # asked for every tick by each partition of a process
def partition_of(symbol: str, partitions: int) -> int:
    """The partition of `symbol` among `partitions` (0 when there is one)."""
    if partitions <= 1:
        return 0
    h = _FNV_OFFSET
    for byte in symbol.encode():
        h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return h % partitions


def signal_transform(partitions: int) -> tuple[str, str] | None:
    """The SIGNALS stream's subject transform (source, destination); None with one partition,
    where subjects stay as published."""
    if partitions <= 1:
        return None
    mapped = "signals.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(N,2)}}"  # the server's template syntax
    return "signals.*.*", mapped.replace("N", str(partitions))


def signal_filter(partition: int | None) -> str:
    """The signals one consumer reads: all of them, or one partition's."""
    return "signals.>" if partition is None else f"signals.*.*.{partition}"


def lane_name(durable: str, partition: int | None) -> str:
    """The durable (and lease, snapshot and start-count key) of one partition."""
    return durable if partition is None else f"{durable}-p{partition}"


def event_symbol(subject: str) -> str | None:
    """The symbol an EVENTS subject names (decisions.<symbol>, orders.<kind>.<symbol>,
    positions.<kind>.<symbol>.<side>); None for events of no one symbol (dead letters, control),
    which every partition reads."""
    first, _, rest = subject.partition(".")
    if first == "decisions":
        return rest or None
    if first in ("orders", "positions"):
        parts = rest.split(".")
        return parts[1] if len(parts) >= 2 else None
    return None


def fair_share(partitions: int, members: int) -> int:
    """The most partitions one of `members` live workers should hold."""
    return math.ceil(partitions / max(members, 1))


@dataclass(frozen=True, slots=True)
class Plan:
    take: tuple[int, ...]  # free partitions to try to lease, in this order
    release: tuple[int, ...]  # held partitions to give back (at most one a round)


def plan(
    partitions: int,
    mine: frozenset[int],
    taken: frozenset[int],
    members: int,
    seed: int,
    overdue: frozenset[int] = frozenset(),
    hungry: bool = True,
) -> Plan:
    """One round of one worker: `mine` it holds, `taken` are held by others, `members` workers
    are alive (this one included). Free partitions are tried from a place that depends on
    `seed` (the worker's own), so workers starting together do not all race for partition 0.
    `overdue` partitions have been free for longer than a lease: whatever the shares say (a
    member counted that cannot take them), they are taken, and nothing is given back meanwhile.
    A partition above the share is given back only when another live worker holds less than
    the share (`hungry`): nobody would take it otherwise."""
    share = fair_share(partitions, members)
    free = [p for p in range(partitions) if p not in mine and p not in taken]
    late = [p for p in free if p in overdue]
    if late:
        return Plan(take=tuple(late), release=())
    if len(mine) > share and hungry:
        return Plan(take=(), release=(max(mine),))
    if not free:
        return Plan(take=(), release=())
    start = seed % len(free)
    ordered = free[start:] + free[:start]
    return Plan(take=tuple(ordered[: share - len(mine)]), release=())
