-- Funding payments of perpetual futures, one row per strategy slice and payment (issue #14):
-- the venue's payment split over the slices open at the funding time. amount > 0 = received.
CREATE TABLE IF NOT EXISTS funding_payments (
    event_id              VARCHAR(64)     NOT NULL PRIMARY KEY,
    strategy_position_id  VARCHAR(64)     NOT NULL,
    strategy_id           VARCHAR(64)     NOT NULL,
    symbol                VARCHAR(64)     NOT NULL,
    position_side         VARCHAR(8)      NOT NULL,
    exchange_position_id  VARCHAR(64)     NULL,
    amount                DECIMAL(36,18)  NOT NULL,
    rate                  DECIMAL(36,18)  NULL,
    mark_price            DECIMAL(36,18)  NULL,
    funding_time          DATETIME(6)     NOT NULL,
    venue_ref             VARCHAR(128)    NOT NULL,
    recorded_at           DATETIME(6)     NOT NULL,
    KEY ix_funding_strategy_time (strategy_id, funding_time),
    KEY ix_funding_position (strategy_position_id)
) ENGINE=InnoDB;

ALTER TABLE strategy_stats ADD COLUMN total_funding DECIMAL(36,18) NOT NULL DEFAULT 0;

-- total_pnl stays the trades' realized PnL (fees included); funding is its own column, and
-- net_pnl is what the strategy made: trades plus funding.
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
    sum_trade_seconds / NULLIF(closed_positions, 0)               AS avg_duration_seconds,
    total_funding,
    total_pnl + total_funding                                     AS net_pnl
FROM strategy_stats;

-- Fees per strategy; funding_fees is what the strategy paid in funding (negative: received).
CREATE OR REPLACE VIEW strategy_fees AS
SELECT
    sp.strategy_id,
    SUM(sp.entry_fee)                                                   AS entry_fees,
    SUM(sp.exit_fees)                                                   AS exit_fees,
    COALESCE(MAX(f.paid), 0)                                            AS funding_fees,
    SUM(sp.entry_fee + sp.exit_fees) + COALESCE(MAX(f.paid), 0)         AS total_fees,
    (SUM(sp.entry_fee + sp.exit_fees) + COALESCE(MAX(f.paid), 0)) / NULLIF(SUM(ABS(sp.gross_pnl)), 0) AS fees_per_gross_pnl
FROM strategy_positions sp
LEFT JOIN (SELECT strategy_id, -SUM(amount) AS paid FROM funding_payments GROUP BY strategy_id) f
    ON f.strategy_id = sp.strategy_id
GROUP BY sp.strategy_id;
