"""Which signals have been decided or executed: the dedupe memory of DESIGN §4.3.

Rebuilt on start from the worker's own events, so a redelivered signal is never executed
twice, and one whose events were only partly published before a crash is recognised.
Keys are 16-byte digests of (strategy_id, signal_id): a third of the memory of the strings.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from engine.domain.events import PositionClosed, PositionOpened, SignalDecided
from engine.domain.model import ZERO, CloseReason, Outcome

_EXECUTED_ONLY = -1
_KEY_BYTES = 16


@functools.lru_cache(maxsize=1024)  # a signal's key is asked for 3-5 times while it is decided
def _key(strategy_id: str, signal_id: str) -> bytes:
    return hashlib.blake2b(f"{strategy_id}\x1f{signal_id}".encode(), digest_size=_KEY_BYTES).digest()


@dataclass(slots=True)
class SignalLedger:
    # digest -> stream sequence of the decided signal message (0 if unknown), or
    # _EXECUTED_ONLY when its open order filled but no decision was stored yet
    _signals: dict[bytes, int] = field(default_factory=dict)
    # digest of (slice owner, signal) -> quantity closed for that close signal so far
    _closed: dict[bytes, Decimal] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._signals)

    def packed(self) -> tuple[bytes, bytes]:
        """The decided signals as two byte strings (their keys end to end, their sequences as
        little-endian int64): a million of them pack in tens of milliseconds, where a list of
        pairs took seconds to write and to read back (a snapshot's restart, issue #16)."""
        sequences = array("q", self._signals.values())
        if sys.byteorder == "big":
            sequences.byteswap()
        return b"".join(self._signals), sequences.tobytes()

    def unpack(self, keys: bytes, sequences: bytes) -> None:
        """Take the decided signals `packed` gave; ValueError if the two do not fit together."""
        numbers = array("q")
        numbers.frombytes(sequences)
        if sys.byteorder == "big":
            numbers.byteswap()
        if len(keys) != _KEY_BYTES * len(numbers):
            raise ValueError(f"{len(keys)} bytes of keys for {len(numbers)} sequences")
        starts = range(0, len(keys), _KEY_BYTES)
        self.restore(zip((keys[i : i + _KEY_BYTES] for i in starts), numbers, strict=True))

    def restore(self, decided: Iterable[tuple[bytes, int]]) -> None:
        """Take the decided signals as (key, sequence) pairs."""
        self._signals = dict(decided)

    def decided_at(self, strategy_id: str, signal_id: str) -> int | bool | None:
        """The decided message's stream sequence (None if unknown), or False if undecided."""
        seq = self._signals.get(_key(strategy_id, signal_id))
        if seq is None or seq == _EXECUTED_ONLY:
            return False
        return seq or None

    def was_opened(self, strategy_id: str, signal_id: str) -> bool:
        """The signal's own position was opened (its decision may have been lost in a crash)."""
        return _key(strategy_id, signal_id) in self._signals

    def closed_for(self, strategy_id: str, signal_id: str) -> Decimal | None:
        """How much a close signal of this strategy has closed so far, None if nothing."""
        return self._closed.get(_key(strategy_id, signal_id))

    def apply(self, event: SignalDecided | PositionOpened | PositionClosed) -> None:
        if isinstance(event, PositionClosed):
            # Closes made for a signal: if its decision was lost in a crash, the redelivery
            # closes only what is left of it. (A reversal's closes need no record: the slices
            # it closed are gone, so deciding it again finds nothing opposite to reverse.)
            if event.signal_id is not None and event.close_reason is CloseReason.SIGNAL:
                key = _key(event.strategy_id, event.signal_id)  # a close signal's own slices
                self._closed[key] = self._closed.get(key, ZERO) + event.closed_quantity
            return
        key = _key(event.strategy_id, event.signal_id)
        if isinstance(event, PositionOpened):
            self._signals.setdefault(key, _EXECUTED_ONLY)
        elif event.outcome is not Outcome.DUPLICATE:
            self._signals[key] = event.signal_sequence or 0
            self._closed.pop(key, None)  # decided: the redelivery is recognised by its sequence
