"""Risk limits from the environment and `RISK_FILE` (TOML, or YAML by its extension).

```toml
[account]                 # the whole account
max_total_notional = 250000
max_notional_per_key = 100000
daily_loss = 5000         # realized PnL, fees and funding since 00:00 UTC
max_leverage = 5

[default]                 # every strategy, unless its own table says otherwise
max_notional = 50000
max_positions = 20
orders_per_minute = 30
daily_loss = 1000

[strategies.momentum_v1]
max_notional = 100000
symbols = ["BTCUSDT", "ETHUSDT"]
```

The file is read once, at start; every bad entry is reported on a line of its own, with the
line of the file it is on, and the process exits 2.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.domain.decide import Rules
from engine.domain.risk import RiskLimits, StrategyLimits

Money = Annotated[Decimal, Field(gt=0, le=Decimal(10) ** 12)]
Symbol = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StrategyTable(_Strict):
    max_notional: Money | None = None
    max_positions: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    orders_per_minute: Annotated[int, Field(ge=1, le=100_000)] | None = None
    symbols: list[Symbol] | None = None
    daily_loss: Money | None = None

    def limits(self) -> StrategyLimits:
        return StrategyLimits(
            max_notional=self.max_notional,
            max_positions=self.max_positions,
            orders_per_minute=self.orders_per_minute,
            symbols=None if self.symbols is None else frozenset(self.symbols),
            daily_loss=self.daily_loss,
        )


class _AccountTable(_Strict):
    max_total_notional: Money | None = None
    max_notional_per_key: Money | None = None
    daily_loss: Money | None = None
    max_leverage: Annotated[int, Field(ge=1, le=125)] | None = None


class _RiskFile(_Strict):
    account: _AccountTable = _AccountTable()
    default: _StrategyTable = _StrategyTable()
    strategies: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")], _StrategyTable] = {}


class RiskFileError(ValueError):
    """The file cannot be used; the message has one line per problem."""


@dataclass(frozen=True, slots=True)
class Risk:
    rules: Rules
    limits: RiskLimits
    max_leverage: int | None


def read_risk_file(path: str) -> _RiskFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RiskFileError(f"RISK_FILE: cannot read {path}: {exc}") from None
    try:
        data = (yaml.safe_load(text) or {}) if path.endswith((".yaml", ".yml")) else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise RiskFileError(f"RISK_FILE {path}: not valid {_kind(path)}: {exc}") from None
    if not isinstance(data, dict):
        raise RiskFileError(f"RISK_FILE {path}: expected tables account, default and strategies")
    try:
        return _RiskFile.model_validate(_plain_numbers(data))
    except ValidationError as exc:
        lines = [
            f"RISK_FILE {path}{_line_of(text, err['loc'])}: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        ]
        raise RiskFileError("\n".join(lines)) from None


def _kind(path: str) -> str:
    return "YAML" if path.endswith((".yaml", ".yml")) else "TOML"


def _plain_numbers(data: Any) -> Any:
    """Floats as their shortest text, so 0.1 is Decimal("0.1"), not its binary neighbour."""
    if isinstance(data, float):
        return repr(data)
    if isinstance(data, dict):
        return {k: _plain_numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain_numbers(v) for v in data]
    return data


def _line_of(text: str, loc: tuple[int | str, ...]) -> str:
    """`:N`, the line where the entry's key first appears after its table's, if found."""
    at = 0
    lines = text.splitlines()
    for part in loc:
        if not isinstance(part, str):
            continue
        pattern = re.compile(rf"(^|[\s.\[\"']){re.escape(part)}([\s\]\"':=.]|$)")
        for n in range(at, len(lines)):
            if pattern.search(lines[n].split("#", 1)[0]):
                at = n
                break
        else:
            return "" if at == 0 else f":{at + 1}"
    return f":{at + 1}"


def load_risk(rules: Rules, env: StrategyLimits, account_daily_loss: Decimal | None,
              max_leverage: int | None, path: str | None) -> Risk:  # fmt: skip
    """The environment's limits, with the file's over them where it sets one."""
    if path is None:
        return Risk(rules, RiskLimits(env, {}, account_daily_loss), max_leverage)
    found = read_risk_file(path)
    account = found.account
    rules = replace(
        rules,
        max_total_notional=account.max_total_notional or rules.max_total_notional,
        max_notional_per_key=account.max_notional_per_key or rules.max_notional_per_key,
    )
    limits = RiskLimits(
        default=found.default.limits().over(env),
        strategies={name: table.limits() for name, table in found.strategies.items()},
        account_daily_loss=account.daily_loss or account_daily_loss,
    )
    return Risk(rules, limits, account.max_leverage or max_leverage)
