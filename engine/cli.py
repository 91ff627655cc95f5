"""`tradeengine` command line: roles (`worker`, `attribution`, `run`) and ops commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import uvloop

import engine
from engine.config import ConfigError, Settings, load_settings
from engine.logs import configure_logging

ROLES = {"worker": frozenset({"worker"}), "attribution": frozenset({"attribution"}),
         "run": frozenset({"worker", "attribution"})}  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tradeengine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tradeengine {engine.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, reads: str, more: str = "") -> argparse.ArgumentParser:
        """A subcommand whose --help says what it does and which variables it reads."""
        return sub.add_parser(
            name, help=text, description=f"{text[0].upper()}{text[1:]}. {more}".strip(),
            epilog=f"Reads {reads}. Every variable: docs/configuration.md.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )  # fmt: skip

    nats_vars = "NATS_URL (else the URL a local `run` wrote), NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED_FILE, NATS_CREDS_FILE, NATS_TLS_*, NATS_CONNECT_TIMEOUT (seconds)"
    command(
        "worker",
        "consume signals, execute, publish events",
        f"{nats_vars}, EXCHANGE and EXCHANGE_*, the risk and conflict settings, HTTP_HOST/HTTP_PORT",
        "Exits 2 on a bad setting, 1 when NATS or the venue cannot be reached at start.",
    )
    command(
        "attribution",
        "persist events into MySQL",
        f"{nats_vars}, MYSQL_URL, MYSQL_CONNECT_TIMEOUT, MYSQL_READ_TIMEOUT (seconds), MIGRATE_ON_START, HTTP_HOST/HTTP_PORT",
    )
    command(
        "run",
        "all roles in one process (starts a bundled NATS when NATS_URL is unset)",
        f"{nats_vars}, MYSQL_URL, EMBEDDED_NATS_PORT, DATA_DIR and every worker setting",
    )
    command(
        "migrate",
        "create the database and apply migrations/",
        "MYSQL_URL, MYSQL_CONNECT_TIMEOUT (seconds), MIGRATIONS_DIR",
    )

    pub = command(
        "publish", "publish a signal and wait for its decision", nats_vars,
        "Exit codes: 0 accepted (or ignored), 3 rejected, 4 dead-lettered, 5 duplicate, 6 no decision "
        "within --timeout; 1 NATS unreachable, 2 bad arguments or settings. Amounts are decimals in the "
        "symbol's units (quantity: base asset, quote-quantity and prices: quote asset); percentages are "
        "fractions (0.05 = 5 %%). confidence defaults to 1.0 (the worker's MIN_CONFIDENCE is 0.6).",
    )  # fmt: skip
    pub.add_argument("strategy_id")
    pub.add_argument("symbol")
    pub.add_argument("action", choices=["buy", "sell", "close", "hold"])
    pub.add_argument("--quantity")
    pub.add_argument("--quote-quantity")
    pub.add_argument("--confidence", default="1.0")
    pub.add_argument("--price", help="reference price, used when no tick was seen")
    pub.add_argument("--take-profit")
    pub.add_argument("--stop-loss")
    pub.add_argument("--take-profit-pct")
    pub.add_argument("--stop-loss-pct")
    pub.add_argument("--position-side", choices=["LONG", "SHORT"])
    pub.add_argument("--signal-id")
    pub.add_argument("--raw", help="publish this JSON payload as it is")
    pub.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the decision")
    pub.add_argument("--no-wait", action="store_true", help="exit once JetStream has stored the signal")

    price = command(
        "price",
        "publish a price tick on prices.<symbol>",
        nats_vars,
        "Checked by the worker's own rules first (exit 2).",
    )
    price.add_argument("symbol")
    price.add_argument("price")

    tail = command(
        "tail",
        "follow decisions, positions and dead letters",
        nats_vars,
        "One line an event; --json for every field.",
    )
    tail.add_argument("--json", action="store_true", help="one JSON event per line")
    tail.add_argument("--strategy")
    tail.add_argument("--symbol")
    tail.add_argument("--all", action="store_true", help="from the start of the stream")

    rep = command(
        "report",
        "strategy performance and attribution from MySQL",
        f"MYSQL_URL, MYSQL_CONNECT_TIMEOUT, MYSQL_READ_TIMEOUT (seconds); {nats_vars} for the last prices (optional)",
    )
    rep.add_argument("--strategy")
    rep.add_argument("--symbol")
    rep.add_argument("--since", type=_utc_time, help="ISO-8601, UTC if naive")
    rep.add_argument("--until", type=_utc_time, help="ISO-8601, UTC if naive")
    rep.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report with charts")
    shape = rep.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="the rows as one JSON document")
    shape.add_argument("--csv", action="store_true", help="the performance rows as CSV")

    for name, text in (
        ("halt", "stop new positions: everything, a strategy, a symbol (TP/SL and closes go on)"),
        ("resume", "lift halts within the scope"),
        ("flatten", "halt the scope and close its positions at market (reason manual)"),
    ):
        ctl = command(
            name,
            text,
            nats_vars,
            "Waits for the worker's answer; exit 1 without one, 2 for a bad scope (docs/risk.md).",
        )
        ctl.add_argument("--strategy", help="a strategy id; none: every strategy")
        ctl.add_argument("--symbol", help="a symbol; none: every symbol")
        ctl.add_argument("--reason", help="recorded with the command")
        ctl.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the worker")
    status = command(
        "status",
        "what is halted, the streams, the roles' consumer lag",
        f"{nats_vars}, WORKER_DURABLE, ATTRIBUTION_DURABLE",
    )
    status.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    status.add_argument(
        "--watch", type=float, metavar="SECONDS", help="show it again every SECONDS until Ctrl-C"
    )
    pos = command(
        "positions", "open positions per key with their strategy slices, at the last price (from NATS alone)",
        nats_vars, "Folds the EVENTS stream as a restarting worker would; unrealized PnL is before fees.",
    )  # fmt: skip
    pos.add_argument("--strategy")
    pos.add_argument("--symbol")
    pos.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    pos.add_argument(
        "--watch", type=float, metavar="SECONDS", help="show it again every SECONDS until Ctrl-C"
    )
    pos.add_argument(
        "--venue", action="store_true", help="also ask the venue what it holds (EXCHANGE, read only)"
    )

    rp = command(
        "replay", "recorded signals and prices through a grid of configurations, side by side (no venue)",
        "the worker's settings as the base configuration; NATS_URL and its credentials without a RECORDING",
        "Without RECORDING, the signals of the SIGNALS stream, the PRICE_HISTORY bars and the funding rates "
        "the desk was paid at, over --since/--until. A RECORDING is JSON lines: {\"at\": ISO time, \"signal\": "
        "payload}, {\"at\": ..., \"tick\": {\"symbol\": S, \"price\": P}} or {\"at\": ..., \"funding\": "
        "{\"symbol\": S, \"rate\": R}}; or CSV (.csv) with at, type and the fields as columns. Runs the real worker parts on the paper venue, once per "
        "configuration; nothing reaches a venue, a consumer or MySQL.",
    )  # fmt: skip
    rp.add_argument("recording", nargs="?", help="JSON lines or CSV, in order (default: read the streams)")
    rp.add_argument(
        "--since",
        type=_utc_time,
        help="ISO-8601, UTC if naive; the streams from (default: 7 days before --until)",
    )
    rp.add_argument(
        "--until", type=_utc_time, help="ISO-8601, UTC if naive; the streams through (default: now)"
    )
    rp.add_argument("--strategies", help="comma-separated strategy ids to take (default: all)")
    rp.add_argument("--symbols", help="comma-separated symbols to take (default: all)")
    rp.add_argument("--save-recording", metavar="FILE", help="also keep what was read from the streams")
    rp.add_argument("--policies", default="accumulate,strongest_wins,reject_duplicates")
    rp.add_argument("--modes", default="hedge,one-way")
    rp.add_argument("--min-confidence", default="0.6", help="comma-separated values")
    rp.add_argument("--risk-files", help="comma-separated RISK_FILE paths to compare (default: the worker's)")
    rp.add_argument("--jobs", type=int, default=0, help="configurations run at once (default: one per core)")
    rp.add_argument(
        "--html", metavar="FILE", help="also write a page with every configuration's equity curve"
    )
    rp_shape = rp.add_mutually_exclusive_group()
    rp_shape.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    rp_shape.add_argument("--csv", action="store_true", help="one row a configuration and strategy")

    emu = command(
        "emulator",
        "serve the Binance USD-M emulator on 127.0.0.1 (tests, rehearsals)",
        "nothing (its options)",
        "docs/venues.md lists what it models.",
    )
    emu.add_argument("--port", type=int, default=8099)
    emu.add_argument("--hedge", action="store_true", help="start in hedge mode (dual side position)")
    emu.add_argument("--api-key", default="emulator-key")
    emu.add_argument("--api-secret", default="emulator-secret")
    emu.add_argument(
        "--taker-fee", default="0.0004", help="the account's taker commission rate (0.0004 = 0.04 %%)"
    )
    emu.add_argument(
        "--extra-markets",
        type=int,
        default=0,
        help="list this many more markets (T000USDT, T001USDT, ... at 10 USDT) besides the five",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"tradeengine: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, settings.secrets())
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_dispatch(args, settings))
    except ConfigError as exc:
        print(f"tradeengine: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # start-up failures: one clear line, secrets redacted, no traceback
        message = f"{type(exc).__name__}: {exc}"
        for secret in settings.secrets():
            message = message.replace(secret, "***")
        print(f"tradeengine: {args.command} failed: {message}", file=sys.stderr)
        return 1


async def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in ROLES:
        from engine.app import runner  # roles never load rich or the ops commands

        await runner.run_roles(settings, ROLES[args.command])
        return 0
    if args.command == "emulator":
        from engine.emulator import binanceusdm

        await binanceusdm.main(
            args.port, args.hedge, args.api_key, args.api_secret, Decimal(args.taker_fee), args.extra_markets
        )
        return 0
    from engine.app import commands

    if args.command == "migrate":
        return await commands.migrate(settings)
    if args.command == "publish":
        return await commands.publish(settings, _signal_payload(args), args.timeout, args.no_wait)
    if args.command == "price":
        return await commands.publish_price(settings, args.symbol, args.price)
    if args.command == "tail":
        return await commands.tail(settings, args.json, args.strategy, args.symbol, args.all)
    if args.command in ("halt", "resume", "flatten"):
        return await commands.control(
            settings, args.command, args.strategy, args.symbol, args.reason, args.wait
        )
    if args.command == "status":
        return await commands.watching(args.watch, lambda: commands.status(settings, args.json))
    if args.command == "positions":
        return await commands.watching(
            args.watch,
            lambda: commands.positions(settings, args.strategy, args.symbol, args.json, args.venue),
        )
    if args.command == "replay":
        return await commands.replay(settings, args)
    if args.command == "report":
        from engine.app.report import ReportFilter

        flt = ReportFilter(args.strategy, args.symbol, args.since, args.until)
        output = "json" if args.json else "csv" if args.csv else "table"
        return await commands.report(settings, flt, args.html, output)
    raise AssertionError(args.command)


def _utc_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _signal_payload(args: argparse.Namespace) -> dict[str, Any]:
    if args.raw:
        payload: dict[str, Any] = json.loads(args.raw)
        return payload
    payload = {
        "strategy_id": args.strategy_id,
        "symbol": args.symbol,
        "action": args.action,
        "confidence": args.confidence,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    optional = {
        "quantity": args.quantity, "quote_quantity": args.quote_quantity, "price": args.price,
        "take_profit": args.take_profit, "stop_loss": args.stop_loss,
        "take_profit_pct": args.take_profit_pct, "stop_loss_pct": args.stop_loss_pct,
        "position_side": args.position_side, "signal_id": args.signal_id,
    }  # fmt: skip
    payload.update({k: v for k, v in optional.items() if v is not None})
    return payload


if __name__ == "__main__":
    sys.exit(main())
