"""All settings in one place (DESIGN §6). An invalid value stops start-up naming the variable."""

from __future__ import annotations

import contextlib
import os
import ssl
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import parse_qsl, unquote, urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.adapters.event_signing import EventSigner
from engine.domain.conflicts import ConflictPolicy
from engine.domain.decide import Rules
from engine.domain.model import PositionMode, SameDirectionPolicy
from engine.domain.reconcile import ExternalCloseAttribution
from engine.domain.risk import StrategyLimits
from engine.risk_file import Risk, RiskFileError, load_risk

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/tradeengine"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class PriceFeedMode(StrEnum):
    """`auto`: poll on a ccxt venue, off on the paper one."""

    AUTO = "auto"
    OFF = "off"
    POLL = "poll"
    STREAM = "stream"


class Switch(StrEnum):
    """`auto`: on for a ccxt venue, off for the paper one."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class TpslPrice(StrEnum):
    LAST = "last"
    MARK = "mark"


class MarginType(StrEnum):
    ISOLATED = "isolated"
    CROSS = "cross"


class ConfigError(ValueError):
    """A setting is wrong; the message names the environment variable."""


CommaList = Annotated[frozenset[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    position_mode: PositionMode = PositionMode.HEDGE
    position_mode_aware_conflicts: bool = True
    same_direction_conflict_resolution: SameDirectionPolicy = SameDirectionPolicy.ACCUMULATE
    max_accumulations_per_position: Annotated[int, Field(ge=1)] = 10
    min_confidence: Annotated[Decimal, Field(ge=0, le=1)] = Decimal("0.6")
    max_signal_age_seconds: Annotated[float, Field(gt=0)] = 300.0
    allowed_strategies: CommaList = frozenset()
    allowed_symbols: CommaList = frozenset()
    max_notional_per_key: Annotated[Decimal, Field(gt=0)] | None = None
    max_total_notional: Annotated[Decimal, Field(gt=0)] | None = None
    max_signal_bytes: Annotated[int, Field(ge=256, le=1024 * 1024)] = 64 * 1024
    # Bounded so that no position the engine can open overflows the projection's DECIMAL(36,18).
    max_order_notional: Annotated[Decimal, Field(gt=0, le=Decimal(10) ** 12)] = Decimal(1_000_000)
    price_band_pct: Annotated[Decimal, Field(gt=0, le=10)] = Decimal("0.1")
    price_max_age_seconds: Annotated[float, Field(gt=0)] = 30.0
    price_feed: PriceFeedMode = PriceFeedMode.AUTO
    price_poll_seconds: Annotated[float, Field(ge=0.1, le=3600)] = 1.0
    tpsl_price: TpslPrice = TpslPrice.LAST
    price_interest_seconds: Annotated[float, Field(gt=0)] = 600.0
    protective_stops: Switch = Switch.AUTO
    protective_stop_pct: Annotated[Decimal, Field(gt=0, lt=1)] | None = None
    max_clock_skew_seconds: Annotated[float, Field(ge=0)] = 60.0
    max_notional_per_strategy: Annotated[Decimal, Field(gt=0)] | None = None
    max_positions_per_strategy: Annotated[int, Field(ge=1)] | None = None
    max_orders_per_minute: Annotated[int, Field(ge=1, le=100_000)] | None = None
    daily_loss_limit: Annotated[Decimal, Field(gt=0)] | None = None
    account_daily_loss_limit: Annotated[Decimal, Field(gt=0)] | None = None
    max_leverage: Annotated[int, Field(ge=1, le=125)] | None = None
    risk_file: str | None = None

    nats_url: str | None = None
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_password_file: str | None = None
    nats_token: SecretStr | None = None
    nats_token_file: str | None = None
    nats_nkey_seed_file: str | None = None
    nats_creds_file: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_connect_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    stream_replicas: Annotated[int, Field(ge=1, le=5)] = 1
    events_signing_key: SecretStr | None = None
    events_signing_key_file: str | None = None
    mysql_url: str | None = None
    exchange: str = "paper"
    paper_taker_fee: Annotated[Decimal, Field(ge=0, lt=1)] = Decimal("0.0005")
    paper_slippage: Annotated[Decimal, Field(ge=0, lt=1)] = Decimal("0")
    paper_balance: Annotated[Decimal, Field(gt=0, le=Decimal(10) ** 12)] = Decimal("100000")
    paper_funding_rate: Annotated[Decimal, Field(ge=-1, le=1)] = Decimal("0.0001")
    paper_extra_markets: Annotated[int, Field(ge=0, le=10_000)] = 0
    funding_poll_seconds: Annotated[float, Field(ge=0)] = 60.0
    # The price history `tradeengine replay` reads: bars of PRICE_HISTORY_INTERVAL seconds kept
    # PRICE_HISTORY_DAYS (0: none recorded) in the PRICE_HISTORY stream.
    price_history_days: Annotated[int, Field(ge=0, le=3650)] = 30
    price_history_interval: Annotated[int, Field(ge=1, le=86_400)] = 10
    default_notional: Annotated[Decimal, Field(gt=0, le=Decimal(10) ** 12)] | None = None

    exchange_api_key: SecretStr | None = None
    exchange_api_secret: SecretStr | None = None
    exchange_api_key_file: str | None = None
    exchange_api_secret_file: str | None = None
    exchange_sandbox: bool = False
    exchange_api_url: str | None = None
    exchange_ws_url: str | None = None
    set_position_mode: bool = False
    external_close_attribution: ExternalCloseAttribution = ExternalCloseAttribution.PRO_RATA
    reconcile_interval_seconds: Annotated[float, Field(ge=0)] = 30.0
    order_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    order_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    exchange_rate_limit_ms: Annotated[float, Field(ge=0)] | None = None
    exchange_recv_window_ms: Annotated[int, Field(ge=100, le=60_000)] = 5000
    order_send_span_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0
    leverage: Annotated[int, Field(ge=1, le=125)] | None = None
    margin_type: MarginType | None = None
    leverage_by_symbol: Annotated[dict[str, int], NoDecode] = {}
    margin_type_by_symbol: Annotated[dict[str, MarginType], NoDecode] = {}

    http_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # Loopback unless asked: /metrics and /readyz tell positions and halts to whoever reaches
    # them. The container sets 0.0.0.0, behind the cluster's network policy.
    http_host: str = "127.0.0.1"
    log_format: LogFormat | None = None
    log_level: str = "INFO"
    data_dir: str = ".tradeengine"
    embedded_nats_port: Annotated[int, Field(ge=1, le=65535)] = 4223

    mysql_connect_timeout: Annotated[float, Field(gt=0, le=300)] = 5.0
    # false under least privilege: `tradeengine migrate` (another user) owns the schema.
    migrate_on_start: bool = True
    mysql_read_timeout: Annotated[float, Field(gt=0)] = 60.0
    attribution_stall_seconds: Annotated[float, Field(gt=0)] = 60.0

    worker_durable: str = "tradeengine-worker"
    # Events stored between snapshots of the worker's state (0: none; every start replays all).
    snapshot_every_events: Annotated[int, Field(ge=0)] = 100_000
    worker_lease_seconds: Annotated[float, Field(ge=2, le=600)] = 10.0
    worker_standby: bool = True
    # Signals spread over this many partitions by symbol (1: one durable, as before); each
    # partition is run by one worker at a time, under a lease of PARTITION_LEASE_SECONDS.
    signal_partitions: Annotated[int, Field(ge=1, le=1024)] = 1
    partition_lease_seconds: Annotated[float, Field(ge=2, le=600)] = 10.0
    max_deliver: Annotated[int, Field(ge=1, le=100)] = 5
    attribution_durable: str = "tradeengine-attribution"
    # Attribution consumers side by side (1: one, as before), each writing its symbols' events.
    attribution_partitions: Annotated[int, Field(ge=1, le=64)] = 1
    fetch_batch: Annotated[int, Field(ge=1, le=10_000)] = 256

    @field_validator("allowed_strategies", "allowed_symbols", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("leverage_by_symbol", "margin_type_by_symbol", mode="before")
    @classmethod
    def _symbol_map(cls, value: Any) -> Any:
        """`BTCUSDT=10,ETHUSDT=5`: a setting per symbol."""
        if not isinstance(value, str):
            return value
        found: dict[str, str] = {}
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            symbol, sep, setting = part.partition("=")
            if not sep or not symbol.strip() or not setting.strip():
                raise ValueError(f"{part!r} is not SYMBOL=VALUE")
            found[symbol.strip().upper()] = setting.strip().lower()
        return found

    @field_validator("leverage_by_symbol")
    @classmethod
    def _leverage_range(cls, value: dict[str, int]) -> dict[str, int]:
        for symbol, leverage in value.items():
            if not 1 <= leverage <= 125:
                raise ValueError(f"{symbol}: leverage {leverage} is not between 1 and 125")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if value.upper() not in levels:
            raise ValueError(f"must be one of {', '.join(levels)}")
        return value.upper()

    @field_validator("mysql_url")
    @classmethod
    def _mysql_url_shape(cls, value: str | None) -> str | None:
        if value is not None:
            MysqlTarget.parse(value)
        return value

    def secrets(self) -> list[str]:
        """Every secret value this process knows, so logs can redact them wherever they appear."""
        found = [
            s.get_secret_value()
            for s in (
                self.exchange_api_key,
                self.exchange_api_secret,
                self.nats_password,
                self.nats_token,
                self.events_signing_key,
            )
            if s
        ]
        for path in (
            self.events_signing_key_file,
            self.exchange_api_key_file,
            self.exchange_api_secret_file,
            self.nats_password_file,
            self.nats_token_file,
        ):
            if path:
                with contextlib.suppress(OSError):
                    found.append(_read_mounted(path))
        for url in (self.mysql_url, self.nats_url):
            if url:
                password = urlparse(url).password
                if password:
                    found.extend({password, unquote(password)})
        return [value for value in found if len(value) >= 4]

    def event_signer(self) -> EventSigner | None:
        key = _secret_or_file(
            self.events_signing_key, self.events_signing_key_file, "EVENTS_SIGNING_KEY_FILE"
        )
        if key is None:
            return None
        try:
            return EventSigner(key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def nats_auth(self) -> dict[str, Any]:
        """nats-py connect options for the configured authentication and TLS (none: {})."""
        options: dict[str, Any] = {}
        password = _secret_or_file(self.nats_password, self.nats_password_file, "NATS_PASSWORD_FILE")
        token = _secret_or_file(self.nats_token, self.nats_token_file, "NATS_TOKEN_FILE")
        if self.nats_user or password:
            if not (self.nats_user and password):
                raise ConfigError("NATS_USER and NATS_PASSWORD (or NATS_PASSWORD_FILE) go together")
            options |= {"user": self.nats_user, "password": password}
        if token:
            options["token"] = token
        for name, path, key in (
            ("NATS_NKEY_SEED_FILE", self.nats_nkey_seed_file, "nkeys_seed"),
            ("NATS_CREDS_FILE", self.nats_creds_file, "user_credentials"),
        ):
            if path:
                if not os.path.isfile(path):
                    raise ConfigError(f"{name}: {path} is not a readable file")
                options[key] = path
        if self.nats_tls_ca or self.nats_tls_cert or self.nats_tls_key:
            options["tls"] = self._nats_tls()
        return options

    def _nats_tls(self) -> ssl.SSLContext:
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ConfigError("NATS_TLS_CERT and NATS_TLS_KEY go together (mutual TLS)")
        try:
            context = ssl.create_default_context(cafile=self.nats_tls_ca)
            if self.nats_tls_cert and self.nats_tls_key:
                context.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"NATS_TLS_CA / NATS_TLS_CERT / NATS_TLS_KEY: {exc}") from None
        return context

    def credentials(self) -> tuple[str | None, str | None]:
        """(API key, secret): the variables, or the mounted files they name."""

        def read(value: SecretStr | None, path: str | None, name: str) -> str | None:
            if value is not None:
                return value.get_secret_value()
            if path is None:
                return None
            try:
                return _read_mounted(path)
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None

        return (
            read(self.exchange_api_key, self.exchange_api_key_file, "EXCHANGE_API_KEY_FILE"),
            read(self.exchange_api_secret, self.exchange_api_secret_file, "EXCHANGE_API_SECRET_FILE"),
        )

    def risk(self) -> Risk:
        """Rules and limits, the file's over the environment's; checks the account's leverage
        settings against the maximum."""
        try:
            risk = load_risk(
                self.rules(),
                StrategyLimits(
                    max_notional=self.max_notional_per_strategy,
                    max_positions=self.max_positions_per_strategy,
                    orders_per_minute=self.max_orders_per_minute,
                    daily_loss=self.daily_loss_limit,
                ),
                self.account_daily_loss_limit,
                self.max_leverage,
                self.risk_file,
            )
        except RiskFileError as exc:
            raise ConfigError(str(exc)) from None
        if risk.max_leverage is not None:
            for name, symbol, leverage in (
                ("LEVERAGE", None, self.leverage),
                *(("LEVERAGE_BY_SYMBOL", s, n) for s, n in self.leverage_by_symbol.items()),
            ):
                if leverage is not None and leverage > risk.max_leverage:
                    where = f" for {symbol}" if symbol else ""
                    raise ConfigError(
                        f"{name}: {leverage}{where} is above the maximum leverage {risk.max_leverage}"
                        " (MAX_LEVERAGE or RISK_FILE account.max_leverage)"
                    )
        return risk

    def rules(self) -> Rules:
        return Rules(
            conflicts=ConflictPolicy(
                position_mode=self.position_mode,
                mode_aware=self.position_mode_aware_conflicts,
                same_direction=self.same_direction_conflict_resolution,
                max_accumulations=self.max_accumulations_per_position,
            ),
            min_confidence=self.min_confidence,
            max_signal_age=timedelta(seconds=self.max_signal_age_seconds),
            allowed_strategies=self.allowed_strategies,
            allowed_symbols=self.allowed_symbols,
            max_notional_per_key=self.max_notional_per_key,
            max_total_notional=self.max_total_notional,
            max_order_notional=self.max_order_notional,
            price_band=self.price_band_pct,
            default_notional=self.default_notional,
            max_clock_skew=timedelta(seconds=self.max_clock_skew_seconds),
        )


def _secret_or_file(value: SecretStr | None, path: str | None, name: str) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        return _read_mounted(path)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path} ({exc.strerror})") from None


def _read_mounted(path: str) -> str:
    """A secret mounted as a file (k8s secrets end with a newline)."""
    with open(path) as f:
        return f.read().strip()


class MysqlTarget:
    """`mysql://user:pass@host:port/db?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem`, parsed once.

    TLS options (as MySQL's own clients name them): `ssl-mode` = `DISABLED` (the default),
    `REQUIRED` (encrypted, the certificate not checked), `VERIFY_CA` (signed by `ssl-ca` or the
    system's CAs) or `VERIFY_IDENTITY` (that, and the host name); `ssl-ca`, and `ssl-cert` with
    `ssl-key` for a client certificate. An `ssl-ca` alone means VERIFY_IDENTITY."""

    MODES = ("DISABLED", "REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY")

    def __init__(
        self, host: str, port: int, user: str, password: str, database: str, tls: dict[str, str] | None = None
    ) -> None:
        self.host, self.port, self.user, self.password, self.database = host, port, user, password, database
        self.tls = tls or {}

    @classmethod
    def parse(cls, url: str) -> MysqlTarget:
        parsed = urlparse(url)
        if parsed.scheme not in ("mysql", "mariadb") or not parsed.hostname:
            raise ValueError("must look like mysql://user:pass@host:port/database")
        database = parsed.path.lstrip("/")
        if not database or not database.replace("_", "").isalnum():
            raise ValueError("needs a database name of letters, digits and underscores")
        tls: dict[str, str] = {}
        for key, value in parse_qsl(parsed.query, keep_blank_values=True):
            name = key.lower().replace("_", "-")
            if name not in ("ssl-mode", "ssl-ca", "ssl-cert", "ssl-key"):
                raise ValueError(f"unknown option {key!r}; TLS takes ssl-mode, ssl-ca, ssl-cert, ssl-key")
            tls[name] = value
        mode = tls.setdefault("ssl-mode", "VERIFY_IDENTITY" if "ssl-ca" in tls else "DISABLED").upper()
        if mode not in cls.MODES:
            raise ValueError(f"ssl-mode {mode!r} is not one of {', '.join(cls.MODES)}")
        tls["ssl-mode"] = mode
        if ("ssl-cert" in tls) != ("ssl-key" in tls):
            raise ValueError("ssl-cert and ssl-key go together")
        return cls(
            host=parsed.hostname,
            port=parsed.port or 3306,
            user=unquote(parsed.username or "root"),
            password=unquote(parsed.password or ""),
            database=database,
            tls=tls,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        mode = self.tls.get("ssl-mode", "DISABLED")
        if mode == "DISABLED":
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls.get("ssl-ca"))
            if "ssl-cert" in self.tls:
                context.load_cert_chain(self.tls["ssl-cert"], self.tls["ssl-key"])
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"MYSQL_URL: TLS files: {exc}") from None
        context.check_hostname = mode == "VERIFY_IDENTITY"
        if mode == "REQUIRED":
            context.verify_mode = ssl.CERT_NONE
        return context

    def __repr__(self) -> str:  # never show the password
        return f"MysqlTarget({self.user}@{self.host}:{self.port}/{self.database})"


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "settings"
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
