"""Dead letters: what the worker keeps of a message it could not take as a signal.

Everything here comes from outside, so every piece of text is cut to a size and made plain
UTF-8 before it goes into an event: a dead letter must always be writable, or the message
that caused it would stop the worker that tries to store it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from engine.domain.events import SignalDead
from engine.domain.model import derive_id
from engine.domain.signals import MalformedSignal, safe_text

DEAD_LETTER_PAYLOAD_LIMIT = 64 * 1024
# Headers worth keeping to trace a message back; anything else (X-Api-Key, Authorization, a
# publisher's own secrets) is dropped, not stored in EVENTS and MySQL for every reader.
KEPT_HEADERS = frozenset({"nats-msg-id", "content-type", "traceparent", "tracestate"})
HEADER_VALUE_LIMIT = 256
ERROR_LIMIT = 500
MAX_ERRORS = 50


def dead_letter(
    subject: str,
    data: bytes,
    headers: Mapping[str, str] | None,
    bad: MalformedSignal,
    sequence: int,
    now: datetime,
) -> SignalDead:
    raw = data[:DEAD_LETTER_PAYLOAD_LIMIT]
    errors = [safe_text(line, ERROR_LIMIT) for line in bad.errors[:MAX_ERRORS]]
    if len(bad.errors) > MAX_ERRORS:
        errors.append(f"... and {len(bad.errors) - MAX_ERRORS} more")
    return SignalDead(
        event_id=derive_id("signal.dead", subject, str(sequence)),
        occurred_at=now,
        subject=safe_text(subject, 512),
        reason_code=bad.reason_code,
        errors=errors,
        payload=raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd"),
        payload_truncated=len(data) > DEAD_LETTER_PAYLOAD_LIMIT,
        headers={
            safe_text(name, 64): safe_text(value, HEADER_VALUE_LIMIT)
            for name, value in (headers or {}).items()
            if name.lower() in KEPT_HEADERS
        },
        received_at=now,
        strategy_id=_short(bad.strategy_id),
        symbol=_short(bad.symbol),
        signal_id=_short(bad.signal_id),
    )


def _short(value: str | None) -> str | None:
    return None if value is None else safe_text(value, 128)
