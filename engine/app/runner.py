"""Start one role or all of them in one process; stop them cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from engine.adapters.embedded_nats import EmbeddedNats
from engine.adapters.gateway import ExchangeGateway
from engine.adapters.nats_bus import NatsBus
from engine.adapters.paper import PaperExchange, synthetic_markets
from engine.config import (
    DEFAULT_MYSQL_URL,
    DEFAULT_NATS_URL,
    ConfigError,
    MysqlTarget,
    PriceFeedMode,
    Settings,
    TpslPrice,
)

log = structlog.get_logger(__name__)
URL_FILE = "nats.url"


class Role(Protocol):
    ready: asyncio.Event

    async def run(self) -> None: ...

    def stop(self) -> None: ...

    async def checks(self) -> dict[str, bool]: ...

    def details(self) -> dict[str, Any]: ...


def build_gateway(settings: Settings) -> ExchangeGateway:
    if settings.exchange == "paper":
        return PaperExchange(
            settings.position_mode,
            settings.paper_taker_fee,
            settings.paper_slippage,
            balance=settings.paper_balance,
            funding_rate=settings.paper_funding_rate,
            markets=synthetic_markets(settings.paper_extra_markets),
        )
    from engine.adapters.ccxt_gateway import (  # ccxt costs ~0.45 s, ~100 MB
        AccountSettings,
        CcxtGateway,
        RetryPolicy,
    )

    if (
        settings.price_feed is PriceFeedMode.STREAM
        and settings.exchange_api_url
        and not settings.exchange_ws_url
    ):
        raise ConfigError(
            "EXCHANGE_WS_URL: PRICE_FEED=stream with EXCHANGE_API_URL set needs the websocket address too"
            " (the streams would otherwise go to the venue's own host)"
        )
    import ccxt.async_support as ccxt_async

    if not hasattr(ccxt_async, settings.exchange):
        raise ConfigError(
            f"EXCHANGE: ccxt has no exchange {settings.exchange!r}; use 'paper' or a ccxt id such as 'binanceusdm'"
        )
    api_key, secret = settings.credentials()
    if not api_key or not secret:
        raise ConfigError(
            f"EXCHANGE_API_KEY / EXCHANGE_API_SECRET (or their _FILE forms) are needed for EXCHANGE={settings.exchange}"
        )
    try:
        gateway = CcxtGateway(
            settings.exchange,
            settings.position_mode,
            api_key,
            secret,
            sandbox=settings.exchange_sandbox,
            api_url=settings.exchange_api_url,
            set_position_mode=settings.set_position_mode,
            timeout=settings.order_timeout_seconds,
            policy=RetryPolicy(
                attempts=settings.order_attempts,
                recv_window=settings.exchange_recv_window_ms / 1000,
                send_span=settings.order_send_span_seconds,
            ),
            rate_limit_ms=settings.exchange_rate_limit_ms,
            account=AccountSettings(
                # Under a maximum, a symbol is never left at whatever leverage the account had.
                leverage=settings.leverage or settings.risk().max_leverage,
                margin_type=settings.margin_type.value if settings.margin_type else None,
                leverage_by_symbol=settings.leverage_by_symbol,
                margin_type_by_symbol={k: v.value for k, v in settings.margin_type_by_symbol.items()},
            ),
            ws_url=settings.exchange_ws_url,
        )
    except ValueError as exc:
        raise ConfigError(f"EXCHANGE: {exc}; use 'paper' or a ccxt id such as 'binanceusdm'") from None
    # Protective stops trigger on the price TP/SL use: the contract (last) price, or the mark.
    gateway.stop_working_type = "MARK_PRICE" if settings.tpsl_price is TpslPrice.MARK else "CONTRACT_PRICE"
    return gateway


def partitioned_worker(settings: Settings, bus: NatsBus, gateway: ExchangeGateway) -> Role:
    """The worker over SIGNAL_PARTITIONS partitions: each partition on the one venue account
    through its own view of it; on the paper venue, each partition with a paper account of its
    own (rebuilt from its own events, as the one worker's is)."""
    from engine.adapters.partition_venue import PartitionVenue
    from engine.app.partitioned import PartitionedWorker

    def lane_venue(owns: Callable[[str], bool]) -> ExchangeGateway:
        if isinstance(gateway, PaperExchange):
            return build_gateway(settings)
        return PartitionVenue(gateway, owns)

    return PartitionedWorker(settings, bus, lane_venue, gateway.start)


def client_nats_url(settings: Settings) -> str:
    """For client commands: NATS_URL, else the URL a local `tradeengine run` wrote, else 4222."""
    if settings.nats_url:
        return settings.nats_url
    written = Path(settings.data_dir) / URL_FILE
    return written.read_text().strip() if written.exists() else DEFAULT_NATS_URL


def mysql_target(settings: Settings) -> MysqlTarget:
    return MysqlTarget.parse(settings.mysql_url or DEFAULT_MYSQL_URL)


async def run_roles(settings: Settings, roles: frozenset[str]) -> None:
    embedded: EmbeddedNats | None = None
    cleanups: list[Callable[[], Awaitable[None]]] = []
    try:
        url = settings.nats_url
        if url is None and "worker" in roles and "attribution" in roles:
            data = Path(settings.data_dir)
            embedded = EmbeddedNats(settings.embedded_nats_port, data / "nats").start()
            url = embedded.url
            (data / URL_FILE).write_text(url)
            log.info("nats.embedded_started", url=url, pid=embedded.process.pid if embedded.process else None)
        url = url or DEFAULT_NATS_URL
        running: list[Role] = []
        # The venue's settings are checked before anything connects: a typo is a configuration
        # error (exit 2), not a connection failure.
        gateway = build_gateway(settings) if "worker" in roles else None
        if gateway is not None:
            cleanups.append(gateway.close)
        bus = await NatsBus.connect(url, "tradeengine", settings.nats_connect_timeout, settings.nats_auth())
        bus.signer = settings.event_signer()
        bus.replicas = settings.stream_replicas
        cleanups.append(bus.close)
        if gateway is not None and settings.signal_partitions > 1:
            running.append(partitioned_worker(settings, bus, gateway))
        elif gateway is not None:
            from engine.app.worker import Worker

            running.append(Worker(settings, bus, gateway))
        if "attribution" in roles:
            from engine.adapters.mysql_store import MysqlStore  # the worker never loads asyncmy
            from engine.app.attribution import AttributionConsumers

            store = await MysqlStore.open(
                mysql_target(settings),
                create_database=settings.migrate_on_start,
                connect_timeout=settings.mysql_connect_timeout,
                read_timeout=settings.mysql_read_timeout,
                connections=max(4, settings.attribution_partitions + 2),  # a writer each, and the probes
            )
            cleanups.append(store.close)
            running.append(AttributionConsumers(settings, bus, store))
        if settings.http_port:
            from engine.adapters.http import start_http

            async def readiness() -> dict[str, bool]:
                checks = {"nats": bus.nc.is_connected}
                for role in running:
                    checks |= await role.checks()
                return checks

            def details() -> dict[str, Any]:
                found: dict[str, Any] = {}
                for role in running:
                    found |= role.details()
                return found

            where = f"http://{settings.http_host}:{settings.http_port}"
            try:
                runner = await start_http(settings.http_host, settings.http_port, readiness, details)
            except OSError as exc:  # the port is taken: the roles run on, without their probes
                log.error("http.unavailable", address=where, error=str(exc), fix="set HTTP_PORT")
            else:
                cleanups.append(runner.cleanup)
                log.info("http.listening", metrics=f"{where}/metrics", readyz=f"{where}/readyz")
        await _run_until_signalled(running)
    finally:
        for cleanup in reversed(cleanups):
            try:
                await asyncio.wait_for(cleanup(), timeout=5.0)
            except Exception as exc:
                log.warning(
                    "shutdown.cleanup_failed", step=getattr(cleanup, "__qualname__", "?"), error=repr(exc)
                )
        if embedded is not None:
            embedded.stop()
            (Path(settings.data_dir) / URL_FILE).unlink(missing_ok=True)


async def _run_until_signalled(roles: list[Role]) -> None:
    loop = asyncio.get_running_loop()

    def request_stop() -> None:
        log.info("shutdown.requested")
        for role in roles:
            role.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop)
    tasks = [asyncio.create_task(role.run(), name=type(role).__name__) for role in roles]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                request_stop()
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
