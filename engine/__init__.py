"""tradeengine: NATS-driven trade execution with per-strategy PnL attribution."""

__version__ = "0.1.0"
