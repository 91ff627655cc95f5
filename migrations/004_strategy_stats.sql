-- strategy_performance from a per-strategy summary kept by the attribution consumer in the same
-- transaction as the events (so it is exact and idempotent), instead of a scan of every position:
-- constant time whatever the number of positions (bench/analytics_scale.py).

CREATE TABLE IF NOT EXISTS strategy_stats (
    strategy_id            VARCHAR(64)     NOT NULL PRIMARY KEY,
    total_positions        BIGINT          NOT NULL DEFAULT 0,
    open_positions         BIGINT          NOT NULL DEFAULT 0,
    closed_positions       BIGINT          NOT NULL DEFAULT 0,
    tp_hits                BIGINT          NOT NULL DEFAULT 0,
    sl_hits                BIGINT          NOT NULL DEFAULT 0,
    winning_trades         BIGINT          NOT NULL DEFAULT 0,
    losing_trades          BIGINT          NOT NULL DEFAULT 0,
    total_pnl              DECIMAL(36,18)  NOT NULL DEFAULT 0,
    total_fees             DECIMAL(36,18)  NOT NULL DEFAULT 0,
    winning_pnl            DECIMAL(36,18)  NOT NULL DEFAULT 0,
    losing_pnl             DECIMAL(36,18)  NOT NULL DEFAULT 0,
    sum_trade_pnl_pct      DECIMAL(36,18)  NOT NULL DEFAULT 0,
    sum_trade_seconds      DECIMAL(36,6)   NOT NULL DEFAULT 0
) ENGINE=InnoDB;

INSERT INTO strategy_stats (strategy_id, total_positions, open_positions, closed_positions, tp_hits, sl_hits,
    winning_trades, losing_trades, total_pnl, total_fees, winning_pnl, losing_pnl, sum_trade_pnl_pct,
    sum_trade_seconds)
SELECT strategy_id, COUNT(*), SUM(status = 'open'), SUM(status = 'closed'),
    SUM(status = 'closed' AND close_reason = 'take_profit'), SUM(status = 'closed' AND close_reason = 'stop_loss'),
    SUM(status = 'closed' AND realized_pnl > 0), SUM(status = 'closed' AND realized_pnl < 0),
    SUM(realized_pnl), SUM(entry_fee + exit_fees),
    SUM(CASE WHEN status = 'closed' AND realized_pnl > 0 THEN realized_pnl ELSE 0 END),
    SUM(CASE WHEN status = 'closed' AND realized_pnl < 0 THEN realized_pnl ELSE 0 END),
    ROUND(COALESCE(SUM(CASE WHEN status = 'closed' THEN realized_pnl / (entry_price * quantity) * 100 END), 0), 18),
    COALESCE(SUM(CASE WHEN status = 'closed' THEN TIMESTAMPDIFF(MICROSECOND, opened_at, closed_at) / 1000000 END), 0)
FROM strategy_positions
GROUP BY strategy_id
ON DUPLICATE KEY UPDATE strategy_stats.strategy_id = strategy_stats.strategy_id;

CREATE OR REPLACE VIEW strategy_performance AS
SELECT
    strategy_id,
    total_positions,
    open_positions,
    closed_positions,
    tp_hits,
    sl_hits,
    winning_trades,
    losing_trades,
    winning_trades / NULLIF(closed_positions, 0)                  AS win_rate,
    total_pnl,
    total_fees,
    sum_trade_pnl_pct / NULLIF(closed_positions, 0)               AS avg_pnl_pct,
    winning_pnl / NULLIF(-losing_pnl, 0)                          AS profit_factor,
    sum_trade_seconds / NULLIF(closed_positions, 0)               AS avg_duration_seconds
FROM strategy_stats;
