"""Takes control commands from the CONTROL stream, one at a time, in order, while this worker
holds the lease: each is applied, its `ControlApplied` event stored, then it is acked. A flatten
redelivered after a crash closes what is still open and nothing twice: its close orders have
client ids derived from the slices and their close counts, and the journal holds any whose
outcome is unknown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal

import structlog
from nats.aio.msg import Msg

from engine import metrics
from engine.adapters.leases import LeaseLost
from engine.adapters.nats_bus import CONTROL_STREAM, NatsBus
from engine.adapters.nats_consumers import jetstream_sequences
from engine.domain.control import (
    COMMANDS,
    BadCommand,
    CommandName,
    Outcome,
    apply_command,
    control_event,
    parse_command,
)
from engine.domain.events import Event
from engine.domain.risk import RiskBook, Scope

log = structlog.get_logger(__name__)
MAX_HALTS = 256


class KillSwitch:
    def __init__(
        self,
        bus: NatsBus,
        durable: str,
        risk: RiskBook,
        clock: Callable[[], datetime],
        emit: Callable[[Event], None],
        flush: Callable[[], Awaitable[None]],
        flatten: Callable[[Scope], Awaitable[list[str]]],
    ) -> None:
        self.bus, self.durable, self.risk, self.clock = bus, durable, risk, clock
        self.emit, self.flush, self.flatten = emit, flush, flatten

    async def keep(self, stopping: asyncio.Event) -> None:
        """Never ends while the worker runs: a failure (NATS away, a flush that failed) is
        logged, and the command comes again after a pause; an unacked one is redelivered."""
        delay = 0.5
        while not stopping.is_set():
            try:
                sub = await self.bus.durable_consumer(
                    CONTROL_STREAM, self.durable, "control.>", max_ack_pending=1
                )
                while not stopping.is_set():
                    for msg in await sub.next_batch(1, idle_wait=0.5):
                        await self.handle(msg)
                    delay = 0.5
            except LeaseLost:
                return
            except Exception as exc:
                log.error("control.consumer_failed", error=repr(exc)[:300])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def handle(self, msg: Msg) -> None:
        sequence = jetstream_sequences(msg)[0]
        working = asyncio.create_task(_keep_in_progress(msg))  # a long flatten is not redelivered
        try:
            await self._apply(msg.subject, msg.data, sequence)
        except Exception as exc:  # a bug costs this command, never the worker
            log.exception("control.internal_error", subject=msg.subject)
            name = msg.subject.removeprefix("control.")
            known: CommandName = next((c for c in COMMANDS if c == name), "halt")
            self._answer(f"control-{sequence}", known, Scope(), "rejected", f"internal error: {type(exc).__name__}",
                         self.clock(), sequence=sequence)  # fmt: skip
        finally:
            working.cancel()
        await self.flush()
        await msg.ack()
        self.report()

    async def _apply(self, subject: str, data: bytes, sequence: int) -> None:
        command = parse_command(subject, data, sequence)
        now = self.clock()
        if isinstance(command, BadCommand):
            log.warning("control.rejected", subject=subject, error=command.error)
            metrics.CONTROL_COMMANDS.labels(command.name or "unknown", "rejected").inc()
            self._answer(
                command.command_id,
                command.name or "halt",
                Scope(),
                "rejected",
                command.error,
                now,
                sequence=sequence,
            )
            return
        if (
            command.name != "resume"
            and command.scope not in self.risk.halts
            and len(self.risk.halts) >= MAX_HALTS
        ):
            # Every control event lists the halts in force: their number is bounded.
            self._answer(
                command.command_id,
                command.name,
                command.scope,
                "rejected",
                f"{len(self.risk.halts)} halts are in force, the most there may be; halt a wider scope",
                now,
                sequence=sequence,
            )
            return
        changed, text = apply_command(self.risk, command, now)
        closed: list[str] = []
        if command.name == "flatten":
            # Halts are stored before the closes go out: nothing reopens what is being closed.
            self._answer(
                f"{command.command_id}:halt",
                "halt",
                command.scope,
                "applied" if changed else "unchanged",
                text,
                now,
                sequence=sequence,
            )
            await self.flush()
            closed = await self.flatten(command.scope)
            text += f"; closed {len(closed)} position(s)"
        outcome: Literal["applied", "unchanged"] = "applied" if changed or closed else "unchanged"
        log.warning(
            "control.applied", command=command.name, scope=str(command.scope), outcome=outcome, reason=text
        )
        metrics.CONTROL_COMMANDS.labels(command.name, outcome).inc()
        self._answer(
            command.command_id,
            command.name,
            command.scope,
            outcome,
            text,
            self.clock(),
            closed=closed,
            sequence=sequence,
        )

    def _answer(self, command_id: str, name: CommandName, scope: Scope, outcome: Outcome, text: str,
                now: datetime, **more: Any) -> None:  # fmt: skip
        self.emit(control_event(self.risk, command_id, name, scope, outcome, text, now, **more))

    def report(self) -> None:
        now = self.clock()
        metrics.HALTS.set(len(self.risk.in_force(now)))

    def details(self) -> dict[str, Any]:
        return {"halted": [str(h.scope) for h in self.risk.in_force(self.clock())]}


async def _keep_in_progress(msg: Msg, every: float = 15.0) -> None:
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(Exception):
            await msg.in_progress()
