"""SQL text for MySQL / MariaDB, rendered by us: literals (asyncmy's escaping, in the server's
quoting mode), multi-row inserts, and rendering that gives the event loop a turn."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

from asyncmy.constants.SERVER_STATUS import SERVER_STATUS_NO_BACKSLASH_ESCAPES
from asyncmy.converters import escape_bytes_prefixed, escape_item, escape_string

from engine.domain.model import decimal_text


def utc_naive(value: datetime) -> datetime:
    """MySQL DATETIME has no zone: we store naive UTC."""
    return value.astimezone(UTC).replace(tzinfo=None)


def no_backslash_escapes(conn: Any) -> bool:
    return bool(conn.server_status & SERVER_STATUS_NO_BACKSLASH_ESCAPES)


class SqlLiterals:
    """Values written as SQL literals exactly as asyncmy's `Connection.literal` writes them (a
    test compares the two), at under half the cost: asyncmy's per-value dispatch was a third of
    the attribution consumer's CPU (bench/RESULTS.md). Strings still go through asyncmy's own
    escaping, in the connection's quoting mode; a type not listed here goes to asyncmy."""

    # A statement must fit in the server's max_allowed_packet (1 MiB on the oldest servers, which
    # asyncmy also assumes): at most 4 bytes a character in UTF-8, 250,000 characters always fit.
    MAX_STATEMENT_CHARS = 250_000

    def __init__(self, no_backslash_escapes: bool) -> None:
        self._escape: Callable[[str], str] = _double_quotes if no_backslash_escapes else escape_string
        self._datetimes: dict[datetime, str] = {}
        self._by_type: dict[type[Any], Callable[[Any], str]] = {
            str: self._string,
            Decimal: decimal_text,  # exponent notation would be read as a DOUBLE
            int: str,
            bool: _bool_literal,
            type(None): _null_literal,
            datetime: self._datetime,
        }

    def _string(self, value: str) -> str:
        return "'" + self._escape(value) + "'"

    def _datetime(self, value: datetime) -> str:
        # isoformat costs more than all of a row's other values; a batch's rows share a few times.
        found = self._datetimes.get(value)
        if found is None:
            if value.tzinfo is not None:
                return self._other(value)
            found = self._datetimes[value] = "'" + value.isoformat(" ") + "'"
        return found

    def _other(self, value: Any) -> str:
        """Types without a fast path, as asyncmy's `Connection.literal` writes them."""
        if isinstance(value, str):  # str subclasses, StrEnum members: their text, quoted
            return self._string(value)
        if isinstance(value, bytes | bytearray):
            return escape_bytes_prefixed(bytes(value))
        return str(escape_item(value, "utf8mb4"))

    def literal(self, value: Any) -> str:
        return (self._by_type.get(type(value)) or self._other)(value)

    def row(self, values: Sequence[Any]) -> str:
        by_type, other = self._by_type, self._other
        return "(" + ",".join([(by_type.get(type(v)) or other)(v) for v in values]) + ")"

    def statements(self, head: str, rows: Iterable[Sequence[Any]], tail: str = "") -> list[str]:
        """`head` + the rows' VALUES lists + `tail`, in as few statements as the size cap allows."""
        return finish(self.statement_steps(head, rows, tail))

    def statement_steps(
        self, head: str, rows: Iterable[Sequence[Any]], tail: str = ""
    ) -> Generator[None, None, list[str]]:
        """`statements`, pausing every PAUSE_EVERY rows (see `project_cooperatively`)."""
        statements: list[str] = []
        parts: list[str] = []
        size = 0
        for n, values in enumerate(rows, 1):
            text = self.row(values)
            if parts and size + len(text) > self.MAX_STATEMENT_CHARS:
                statements.append(head + ",".join(parts) + tail)
                parts, size = [], 0
            parts.append(text)
            size += len(text) + 1
            if n % PAUSE_EVERY == 0:
                yield
        if parts:
            statements.append(head + ",".join(parts) + tail)
        return statements


PAUSE_EVERY = 128  # rows: about a millisecond of rendering


T = TypeVar("T")


def finish(steps: Generator[None, None, T]) -> T:
    """Run a stepped computation to its end, without pausing."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def finish_cooperatively(steps: Generator[None, None, T]) -> T:
    """Run a stepped computation to its end, giving the event loop a turn at each step."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await asyncio.sleep(0)


def _double_quotes(value: str) -> str:
    return value.replace("'", "''")  # what asyncmy does in this mode


def _bool_literal(value: bool) -> str:
    return "1" if value else "0"


def _null_literal(_: None) -> str:
    return "NULL"


_INSERT_PARTS = re.compile(r"^(.*?\bVALUES\s*)\((?:\s*%s\s*,)*\s*%s\s*\)(.*)$", re.S)


@dataclass(frozen=True, slots=True)
class MultiRowInsert:
    """An INSERT written with one `VALUES (%s, ...)` row, sent as one statement for many rows."""

    head: str
    tail: str

    @classmethod
    def of(cls, sql: str) -> MultiRowInsert:
        match = _INSERT_PARTS.match(sql)
        if match is None:
            raise ValueError(f"not a single-row INSERT with placeholders only: {sql[:80]!r}")
        return cls(match.group(1), match.group(2))

    def statements(self, literals: SqlLiterals, rows: Iterable[Sequence[Any]]) -> list[str]:
        return literals.statements(self.head, rows, self.tail)

    def statement_steps(
        self, literals: SqlLiterals, rows: Iterable[Sequence[Any]]
    ) -> Generator[None, None, list[str]]:
        return literals.statement_steps(self.head, rows, self.tail)

    async def run(self, cur: Any, rows: Sequence[Sequence[Any]]) -> None:
        for statement in self.statements(SqlLiterals(no_backslash_escapes(cur.connection)), rows):
            await cur.execute(statement)  # no args: asyncmy leaves the text as it is
