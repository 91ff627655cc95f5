"""The signal contract (DESIGN §3.1): parsing raw bytes into a validated `Signal`.

Parsing is pure: it never raises for bad input; it returns a `MalformedSignal` carrying a
precise list of errors, which the worker turns into a dead letter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from engine.domain.model import Action, PositionSide, SignalId, StrategyId, decimal_text, load_json_exact
from engine.domain.partitions import partition_of
from engine.domain.reasons import DeadLetter

TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_TOKEN = re.compile(TOKEN_PATTERN)
# Visible ASCII only: a signal id travels in a NATS header (Nats-Msg-Id) and in log lines, and
# "x " must never be the same signal as "x" (nothing is stripped).
SIGNAL_ID_PATTERN = r"^[!-~]{1,128}$"
MAX_SIGNAL_BYTES = 64 * 1024
# Levels of arrays/objects, the payload itself being level 1. Checked on the raw bytes before
# parsing (a deep payload exhausts the decoder's recursion); MariaDB refuses JSON deeper than
# 32 levels, and metadata sits one level down.
MAX_JSON_DEPTH = 16
MAX_TEXT_LENGTH = 64  # free-text fields: strategy, source, strength
MAX_METADATA_STRING = 4096
# Every amount stays below 10^9, so a quantity times a price stays below 10^18 and fits the
# DECIMAL(36,18) columns of the projection.
MAX_AMOUNT = Decimal(10) ** 9
MIN_PLACES = 18
# Numbers anywhere in a payload (metadata included) stay within this many powers of ten: an
# event writes decimals out in full, and 1E+999999 is a megabyte of digits.
MAX_EXPONENT = 30
_LONG_EXPONENT = re.compile(rb"[eE][+-]?0*[1-9]\d")  # an exponent of two digits or more
_EPOCH_MS_THRESHOLD = 100_000_000_000  # epochs above this are milliseconds (year 5138 in s)


_DECIMAL_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _no_bool_or_nan(value: Any) -> Any:
    """JSON `true` is not a number, NaN/Infinity are never prices, and every amount must fit
    the projection: below 10^9 in size and, if not 0, at least 10^-18 (1E-999999 would be
    written out digit by digit in every event). Checked here, in the one Python call each
    amount gets anyway (pydantic's own constraints cost several times as much)."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        value = Decimal(repr(value))  # Decimal from the shortest repr: 0.1 stays 0.1
    elif isinstance(value, str):
        text = value.strip()
        if not _DECIMAL_TEXT.fullmatch(text):
            raise ValueError("must be a decimal number")
        value = Decimal(text)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("must be a finite number")
        if not -MAX_AMOUNT < value < MAX_AMOUNT:
            raise ValueError(f"must be below {MAX_AMOUNT:,} in size")
        if value and value.adjusted() < -MIN_PLACES:
            raise ValueError(f"must be 0 or at least 1E-{MIN_PLACES} in size")
    elif isinstance(value, int) and not -MAX_AMOUNT < value < MAX_AMOUNT:
        raise ValueError(f"must be below {MAX_AMOUNT:,} in size")
    return value


Number = Annotated[Decimal, BeforeValidator(_no_bool_or_nan), Field(allow_inf_nan=False)]
PositiveNumber = Annotated[Decimal, BeforeValidator(_no_bool_or_nan), Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[Decimal, BeforeValidator(_no_bool_or_nan), Field(gt=0, lt=1, allow_inf_nan=False)]
Text = Annotated[str, Field(max_length=MAX_TEXT_LENGTH)]


def parse_timestamp(value: Any) -> datetime:
    """ISO-8601 (naive means UTC) or epoch seconds / milliseconds, as number or digits."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO-8601 or epoch seconds/milliseconds")
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        value = Decimal(value.strip())
    if isinstance(value, int | float | Decimal):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("timestamp must be finite")
        seconds = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        if seconds > _EPOCH_MS_THRESHOLD:
            seconds /= 1000
        try:
            return datetime.fromtimestamp(float(seconds), tz=UTC)
        except (OverflowError, OSError, ValueError, ArithmeticError) as exc:
            raise ValueError(f"timestamp {value} is out of range") from exc
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"timestamp {value!r} is not ISO-8601 or an epoch") from exc
    else:
        raise ValueError("timestamp must be ISO-8601 or epoch seconds/milliseconds")
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:  # "0001-01-01T00:00:00+01:00" has no UTC time
        raise ValueError(f"timestamp {value!r} is out of range") from exc


class Signal(BaseModel):
    """A strategy's instruction. Unknown fields are ignored so petrosa payloads are accepted."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    strategy_id: Annotated[str, Field(pattern=TOKEN_PATTERN)]
    symbol: Annotated[str, Field(pattern=TOKEN_PATTERN)]
    action: Action
    signal_id: Annotated[str, Field(pattern=SIGNAL_ID_PATTERN)] | None = None
    confidence: Annotated[Number, Field(ge=0, le=1)] = Decimal(1)
    quantity: PositiveNumber | None = None
    quote_quantity: PositiveNumber | None = None
    take_profit: PositiveNumber | None = None
    stop_loss: PositiveNumber | None = None
    take_profit_pct: Fraction | None = None
    stop_loss_pct: Fraction | None = None
    # A fraction of the account's available balance, as the original system's strategies size.
    position_size_pct: Fraction | None = None
    position_side: PositionSide | None = None
    price: PositiveNumber | None = None
    current_price: PositiveNumber | None = None
    timestamp: Annotated[datetime, BeforeValidator(parse_timestamp)] | None = None
    timeframe: Annotated[str, Field(max_length=16)] | None = None
    strategy: Text | None = None
    source: Text | None = None
    strength: Text | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("action", mode="before")
    @classmethod
    def _lower_action(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("position_side", mode="before")
    @classmethod
    def _upper_side(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("strength", mode="before")
    @classmethod
    def _strength_as_text(cls, value: Any) -> Any:
        # petrosa sends "weak"/"strong"; others send a number. Both are kept as text.
        if isinstance(value, Decimal):
            return decimal_text(value)  # JSON fractions arrive as exact Decimals
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @property
    def sized(self) -> bool:
        return (
            self.quantity is not None or self.quote_quantity is not None or self.position_size_pct is not None
        )

    @property
    def sized_by_balance(self) -> bool:
        """Sized as a share of the account's balance (nothing more explicit given)."""
        return self.position_size_pct is not None and self.quantity is None and self.quote_quantity is None

    @property
    def key_strategy(self) -> StrategyId:
        return StrategyId(self.strategy_id)

    @property
    def id(self) -> SignalId:
        assert self.signal_id is not None, "parse_signal always sets signal_id"
        return SignalId(self.signal_id)

    @property
    def opening_side(self) -> PositionSide | None:
        if self.action is Action.BUY:
            return PositionSide.LONG
        if self.action is Action.SELL:
            return PositionSide.SHORT
        return None

    @property
    def reference_price(self) -> Decimal | None:
        return self.price or self.current_price


@dataclass(frozen=True, slots=True)
class MalformedSignal:
    """Input that cannot be a signal. `errors` are 'field: message' lines for humans."""

    reason_code: str
    errors: tuple[str, ...]
    strategy_id: str | None = None
    symbol: str | None = None
    signal_id: str | None = None


def derive_signal_id(payload: dict[str, Any]) -> SignalId:
    """Deterministic from the content, so a republished id-less signal is still a duplicate."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return SignalId("d-" + hashlib.sha256(canonical.encode()).hexdigest()[:40])


def subject_tokens(subject: str, partitions: int = 1) -> tuple[str, str] | None:
    """(strategy, symbol) of `signals.<strategy>.<symbol>`, or of the
    `signals.<strategy>.<symbol>.<partition>` a partitioned stream maps it to: under partitions,
    the symbol's own partition only (another is left from a change of the partition count, and
    is never run out of order); without, any (one worker reads every partition's leftovers)."""
    parts = subject.split(".")
    if parts[0] != "signals" or not (len(parts) == 3 or (len(parts) == 4 and parts[3].isdigit())):
        return None
    strategy, symbol = parts[1], parts[2]
    if not (_TOKEN.match(strategy) and _TOKEN.match(symbol)):
        return None
    if len(parts) == 4 and partitions > 1 and parts[3] != str(partition_of(symbol, partitions)):
        return None
    return strategy, symbol


def _format_errors(exc: ValidationError) -> tuple[str, ...]:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "payload"
        lines.append(safe_text(f"{where}: {err['msg']}", 500))
    return tuple(lines)


_BRACKET = re.compile(rb"[\[\]{}]")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # linear: the two alternatives never overlap


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays and objects of `data` nest deeper than `limit`, read off the raw
    bytes without parsing. Nearly every payload has fewer brackets than the limit in all, which
    two `count` calls show; only the rest is scanned (strings removed first)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub(b"", data)):
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _first_problem(value: Any, where: str, check: Callable[[Any, str], str | None]) -> str | None:
    """`check` on every key and value of a parsed payload, depth first; the first problem."""
    problem = check(value, where)
    if problem:
        return problem
    if isinstance(value, dict):
        for key, item in value.items():
            problem = check(key, where) or _first_problem(item, f"{where}.{safe_text(str(key), 40)}", check)
            if problem:
                return problem
    elif isinstance(value, list):
        for n, item in enumerate(value):
            problem = _first_problem(item, f"{where}[{n}]", check)
            if problem:
                return problem
    return None


def _text_check(value: Any, where: str) -> str | None:
    if not isinstance(value, str):
        return None
    if "\x00" in value:
        return f"{where}: contains NUL (\\u0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{where}: contains a lone surrogate, which is not Unicode text"
    return None


def _number_check(value: Any, where: str) -> str | None:
    if isinstance(value, Decimal) and value and not -MAX_EXPONENT <= value.adjusted() <= MAX_EXPONENT:
        return f"{where}: a number beyond 1E±{MAX_EXPONENT}"
    return None


def text_problem(value: Any, where: str = "payload") -> str | None:
    """'where: what' for the first string (key or value) that is not plain Unicode text: a
    lone surrogate ("\\ud800") cannot be written as UTF-8 by anything downstream, and NUL ends
    strings in C libraries. Raw bytes cannot hold either (the UTF-8 decode and the JSON
    decoder refuse them); only \\u escapes can."""
    return _first_problem(value, where, _text_check)


def number_problem(value: Any, where: str = "payload") -> str | None:
    """'where: what' for the first number beyond 10^±MAX_EXPONENT anywhere in the payload."""
    return _first_problem(value, where, _number_check)


def safe_text(value: str, limit: int) -> str:
    """`value` cut to `limit` characters, with anything UTF-8 cannot hold replaced: for text
    from outside copied into our own events (dead letters, log fields)."""
    return value[:limit].encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def parse_signal(
    subject: str,
    data: bytes,
    max_bytes: int = MAX_SIGNAL_BYTES,
    sized_by_default: bool = False,
    partitions: int = 1,
) -> Signal | MalformedSignal:
    """Never raises: anything that is not a valid signal comes back as a MalformedSignal.
    `sized_by_default`: buy/sell without any size are valid (the worker has DEFAULT_NOTIONAL)."""
    if len(data) > max_bytes:
        return MalformedSignal(DeadLetter.OVERSIZE, (f"payload is {len(data)} bytes; limit {max_bytes}",))
    tokens = subject_tokens(subject, partitions)
    if tokens is None:
        form = "signals.<strategy_id>.<symbol>"
        if partitions > 1:
            form += f"[.<partition of the symbol among SIGNAL_PARTITIONS={partitions}>]"
        return MalformedSignal(
            DeadLetter.BAD_SUBJECT, (f"subject {safe_text(subject, 300)!r} is not {form}",)
        )
    if json_too_deep(data):
        return MalformedSignal(
            DeadLetter.TOO_DEEP, (f"payload: arrays/objects nest deeper than {MAX_JSON_DEPTH} levels",)
        )
    try:
        payload = load_json_exact(data)
    except (ValueError, RecursionError) as exc:
        return MalformedSignal(
            DeadLetter.BAD_JSON, (f"payload: not valid JSON ({safe_text(str(exc), 300)})",)
        )
    if not isinstance(payload, dict):
        return MalformedSignal(DeadLetter.BAD_JSON, ("payload: must be a JSON object",))
    if b"\\u" in data:
        problem = text_problem(payload)
        if problem:
            return MalformedSignal(DeadLetter.BAD_TEXT, (problem,))
    if _LONG_EXPONENT.search(data):
        problem = number_problem(payload)
        if problem:
            return MalformedSignal(DeadLetter.BAD_JSON, (problem,))
    raw_id = payload.get("signal_id")
    try:
        signal = Signal.model_validate(payload)
    except ValidationError as exc:
        return MalformedSignal(
            DeadLetter.INVALID_FIELD,
            _format_errors(exc),
            strategy_id=_text_or_none(payload.get("strategy_id")),
            symbol=_text_or_none(payload.get("symbol")),
            signal_id=_text_or_none(raw_id),
        )
    except Exception as exc:  # a validator tripped over a value no rule foresaw
        return MalformedSignal(
            DeadLetter.INVALID_FIELD, (f"payload: {type(exc).__name__}: {safe_text(str(exc), 300)}",)
        )
    if signal.opening_side is not None and not signal.sized and not sized_by_default:
        return MalformedSignal(
            DeadLetter.INVALID_FIELD,
            (
                f"payload: {signal.action.value} needs quantity, quote_quantity or position_size_pct"
                " (or DEFAULT_NOTIONAL set on the worker)",
            ),
            strategy_id=signal.strategy_id,
            symbol=signal.symbol,
            signal_id=signal.signal_id,
        )
    for field_name, in_payload, in_subject in (
        ("strategy_id", signal.strategy_id, tokens[0]),
        ("symbol", signal.symbol, tokens[1]),
    ):
        if in_payload != in_subject:
            # A strategy_id not its subject's is one strategy speaking for another: NATS
            # permissions bind a strategy's credentials to its own subjects, not its payloads.
            return MalformedSignal(
                DeadLetter.IDENTITY_MISMATCH if field_name == "strategy_id" else DeadLetter.SUBJECT_MISMATCH,
                (f"{field_name}: {in_payload!r} does not match subject token {in_subject!r}",),
                strategy_id=signal.strategy_id,
                symbol=signal.symbol,
                signal_id=signal.signal_id,
            )
    if signal.signal_id is None:
        signal = signal.model_copy(update={"signal_id": derive_signal_id(payload)})
    return signal


def _text_or_none(value: Any) -> str | None:
    return safe_text(value, 128) if isinstance(value, str) else None
