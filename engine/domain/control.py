"""The kill switch: `control.halt`, `control.resume` and `control.flatten` (issue #15).

A command's payload is `{"command_id", "strategy_id"?, "symbol"?, "reason"?, "requested_by"?}`;
no strategy and no symbol is everything. Applying one changes the `RiskBook`'s halts and gives
the `ControlApplied` event that records it; that event carries every halt in force after it,
so a restart restores the halts from the last one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from engine.domain.events import ControlApplied, HaltEntry
from engine.domain.model import derive_id, load_json_exact
from engine.domain.risk import Halt, HaltCause, RiskBook, Scope

CommandName = Literal["halt", "resume", "flatten"]
Outcome = Literal["applied", "unchanged", "rejected"]
COMMANDS: tuple[CommandName, ...] = ("halt", "resume", "flatten")
MAX_COMMAND_BYTES = 4096
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ID = re.compile(r"^[!-~]{1,128}$")


@dataclass(frozen=True, slots=True)
class Command:
    command_id: str
    name: CommandName
    scope: Scope
    reason: str
    requested_by: str | None = None


@dataclass(frozen=True, slots=True)
class BadCommand:
    command_id: str
    name: CommandName | None
    error: str


def parse_command(subject: str, data: bytes, sequence: int) -> Command | BadCommand:
    """Never raises. A command without an id gets one from its stream sequence."""
    fallback_id = f"control-{sequence}"
    name = subject.removeprefix("control.")
    known: CommandName | None = next((c for c in COMMANDS if c == name), None)
    if known is None:
        return BadCommand(fallback_id, None, f"unknown command subject {subject[:80]!r}; use control.halt, "
                          "control.resume or control.flatten")  # fmt: skip
    if len(data) > MAX_COMMAND_BYTES:
        return BadCommand(fallback_id, known, f"command larger than {MAX_COMMAND_BYTES} bytes")
    try:
        payload: Any = load_json_exact(data) if data.strip() else {}
    except Exception:
        return BadCommand(fallback_id, known, "payload is not JSON")
    if not isinstance(payload, dict):
        return BadCommand(fallback_id, known, "payload must be a JSON object")
    command_id = payload.get("command_id", fallback_id)
    if not isinstance(command_id, str) or not _ID.match(command_id):
        return BadCommand(fallback_id, known, "command_id must be 1-128 visible ASCII characters")
    fields: dict[str, str | None] = {}
    for field_name in ("strategy_id", "symbol"):
        value = payload.get(field_name)
        if value is not None and (not isinstance(value, str) or not _TOKEN.match(value)):
            return BadCommand(command_id, known, f"{field_name} must match [A-Za-z0-9_-]{{1,64}}")
        fields[field_name] = value
    reason = payload.get("reason", "")
    requested_by = payload.get("requested_by")
    for field_name, value in (("reason", reason), ("requested_by", requested_by)):
        if value is not None and (not isinstance(value, str) or len(value) > 200 or not value.isprintable()):
            return BadCommand(
                command_id, known, f"{field_name} must be printable text of at most 200 characters"
            )
    unknown = set(payload) - {"command_id", "strategy_id", "symbol", "reason", "requested_by"}
    if unknown:
        return BadCommand(
            command_id, known, f"unknown field(s): {', '.join(sorted(map(str, unknown)))[:200]}"
        )
    return Command(
        command_id, known, Scope(fields["strategy_id"], fields["symbol"]), reason or "", requested_by
    )


def apply_command(risk: RiskBook, command: Command, now: datetime) -> tuple[bool, str]:
    """Change the halts as the command says: (whether anything changed, what, in words).
    A flatten halts its scope too: what it closed must not be reopened by the next signal."""
    who = f" by {command.requested_by}" if command.requested_by else ""
    why = f": {command.reason}" if command.reason else ""
    if command.name in ("halt", "flatten"):
        changed = risk.halt(Halt(command.scope, HaltCause.OPERATOR, f"halted{who}{why}", now))
        return changed, f"{command.scope} halted" if changed else f"{command.scope} was already halted"
    lifted = risk.resume(command.scope)
    still = [h for h in risk.in_force(now) if h.scope.overlaps(command.scope)]
    if not lifted:
        text = f"{command.scope} was not halted"
    else:
        text = "resumed " + ", ".join(str(h.scope) for h in lifted)
    if any(h.cause is HaltCause.DAILY_LOSS for h in lifted):
        text += "; a day's loss past its limit still refuses openings until 00:00 UTC"
    if still:
        text += "; still halted by " + ", ".join(str(h.scope) for h in still)
    return bool(lifted), text


def halt_entries(risk: RiskBook, now: datetime) -> list[HaltEntry]:
    return [
        HaltEntry(
            strategy_id=h.scope.strategy_id,
            symbol=h.scope.symbol,
            cause=h.cause.value,
            reason=h.reason,
            since=h.since,
            until=h.until,
        )
        for h in risk.in_force(now)
    ]


def restore_halts(risk: RiskBook, event: ControlApplied) -> None:
    """On replay: the halts in force after this event are the ones it lists."""
    if event.outcome == "rejected":
        return
    risk.halts = {
        Scope(e.strategy_id, e.symbol): Halt(
            Scope(e.strategy_id, e.symbol), HaltCause(e.cause), e.reason, e.since, e.until
        )
        for e in event.halted
    }


def control_event(
    risk: RiskBook,
    command_id: str,
    name: CommandName,
    scope: Scope,
    outcome: Outcome,
    reason: str,
    now: datetime,
    *,
    cause: HaltCause = HaltCause.OPERATOR,
    until: datetime | None = None,
    closed: list[str] | None = None,
    sequence: int | None = None,
) -> ControlApplied:
    return ControlApplied(
        event_id=derive_id("control.applied", command_id),
        occurred_at=now,
        command_id=command_id,
        command=name,
        strategy_id=scope.strategy_id,
        symbol=scope.symbol,
        outcome=outcome,
        reason=reason,
        cause=cause.value,
        until=until,
        halted=halt_entries(risk, now),
        closed_positions=closed or [],
        control_sequence=sequence,
    )


def daily_loss_command_id(halt: Halt) -> str:
    return f"daily-loss:{halt.scope.strategy_id or '*'}:{halt.since.isoformat()}"
