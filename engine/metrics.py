"""Prometheus metrics (DESIGN §7). Label sets are bounded: no signal or position ids."""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)
_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: M, *labels: str) -> M:
    """`metric.labels(...)` resolved once per label set (it is on the hot path)."""
    key = (id(metric), labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return cast(M, found)


SIGNALS = Counter("tradeengine_signals_total", "Signals decided, by outcome", ["outcome", "reason_code"])
REDELIVERED_SKIPPED = Counter(
    "tradeengine_signals_redelivered_total", "Redelivered signals whose decision was already stored"
)
DEAD_LETTERS = Counter("tradeengine_dead_letters_total", "Malformed signals dead-lettered", ["reason_code"])
DECISION_LATENCY = Histogram(
    "tradeengine_decision_latency_seconds",
    "Signal received to its events stored in JetStream",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
STRATEGY_POSITIONS_OPENED = Counter(
    "tradeengine_strategy_positions_opened_total", "Strategy positions opened", ["strategy_id"]
)
STRATEGY_POSITIONS_CLOSED = Counter(
    "tradeengine_strategy_positions_closed_total",
    "Strategy position closes (partial closes count)",
    ["strategy_id", "close_reason"],
)
EXCHANGE_POSITIONS_OPENED = Counter(
    "tradeengine_positions_opened_total", "Exchange positions opened from flat", ["position_side"]
)
ORDER_LATENCY = Histogram(
    "tradeengine_order_latency_seconds",
    "Order placement to fill",
    ["venue"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ORDER_ERRORS = Counter("tradeengine_order_errors_total", "Orders refused or failed", ["venue", "error"])
PUBLISH_RETRIES = Counter("tradeengine_event_publish_retries_total", "Event publish attempts that failed")
PRICE_TICKS = Counter("tradeengine_price_ticks_total", "Price ticks applied")
BAD_TICKS = Counter("tradeengine_bad_price_ticks_total", "Price ticks that could not be parsed")
OPEN_STRATEGY_POSITIONS = Gauge("tradeengine_open_strategy_positions", "Open strategy positions")
PARTITIONS_HELD = Gauge("tradeengine_partitions_held", "Signal partitions this worker process runs")
SIGNAL_PARTITIONS = Gauge(
    "tradeengine_signal_partitions", "SIGNAL_PARTITIONS this worker process is configured with"
)
CONSUMER_PENDING = Gauge("tradeengine_consumer_pending", "Messages not yet delivered", ["consumer"])
REALIZED_PNL = Counter("tradeengine_realized_pnl_total", "Net realized PnL (positive part)", ["strategy_id"])
REALIZED_LOSS = Counter(
    "tradeengine_realized_loss_total", "Net realized loss (absolute value)", ["strategy_id"]
)
EVENTS_QUARANTINED = Counter(
    "tradeengine_attribution_quarantined_total", "Events MySQL refused for good, kept aside", ["type"]
)
EVENTS_PERSISTED = Counter("tradeengine_attribution_events_total", "Events written to MySQL", ["type"])
ATTRIBUTION_BATCH = Histogram(
    "tradeengine_attribution_batch_size",
    "Events per MySQL transaction",
    buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 2500),
)

CONSUMER_REDELIVERED = Gauge(
    "tradeengine_consumer_redelivered", "Messages redelivered and not yet acked", ["consumer"]
)
TICKS_DROPPED = Counter(
    "tradeengine_price_ticks_dropped_total", "Oldest ticks dropped while a symbol's backlog was full"
)
CONSUMER_GAPS = Counter(
    "tradeengine_consumer_gaps_total",
    "Deliveries this client never saw (consumer re-created at its ack floor to get them)",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "tradeengine_consumer_ack_pending", "Messages delivered, not yet acked", ["consumer"]
)
RECONCILIATION_FINDINGS = Counter(
    "tradeengine_reconciliation_findings_total", "Differences found between the book and the venue", ["kind"]
)
OPEN_POSITIONS_BY_KEY = Gauge(
    "tradeengine_open_positions_by_key", "Open strategy positions per key", ["symbol", "position_side"]
)
EXPOSURE_BY_KEY = Gauge(
    "tradeengine_exposure_notional",
    "Entry notional of the open exchange position per key",
    ["symbol", "position_side"],
)
LAST_TICK = Gauge("tradeengine_last_price_tick_timestamp_seconds", "Unix time of the last tick", ["symbol"])
ATTRIBUTION_LAG = Gauge("tradeengine_attribution_lag_events", "Events stored in EVENTS, not yet in MySQL")
ATTRIBUTION_STALLED = Gauge(
    "tradeengine_attribution_stalled_seconds",
    "How long the batch being written has waited for MySQL (0 when none waits)",
)
UNLISTED_TICKS = Counter(
    "tradeengine_price_ticks_unlisted_total", "Ticks for symbols the venue does not list (ignored)"
)
VENUE_CLOCK_OFFSET = Gauge(
    "tradeengine_venue_clock_offset_seconds",
    "This host's clock minus the venue's, as last measured (requests are stamped with the venue's)",
    ["venue"],
)
PRICE_FEED_POLLED = Gauge(
    "tradeengine_price_feed_last_poll_timestamp_seconds",
    "Unix time the venue last answered the price feed's poll",
    ["source"],
)
FUNDING = Gauge(
    "tradeengine_funding_net",
    "Funding received (negative: paid) per strategy since this process started",
    ["strategy_id"],
)
STOPS = Counter(
    "tradeengine_protective_stops_total",
    "Protective stop orders at the venue: placed, cancelled, refused, triggered",
    ["event"],
)
CONTROL_COMMANDS = Counter(
    "tradeengine_control_commands_total",
    "Halt, resume and flatten commands, by outcome",
    ["command", "outcome"],
)
HALTS = Gauge("tradeengine_halts", "Halts in force (operator and day's-loss)")
EVENTS_DISTRUSTED = Counter(
    "tradeengine_events_distrusted_total", "Events without a valid worker signature, ignored", ["role"]
)
