-- Analytics views (issue #5). Definitions and example queries: docs/analytics.md.
-- Portable to MySQL 8 and MariaDB 10.6+: window functions, derived tables, no vendor JSON functions.

ALTER TABLE position_closes ADD COLUMN exchange_quantity_after DECIMAL(36,18) NULL AFTER exit_price;

CREATE INDEX ix_close_strategy_time ON position_closes (strategy_id, closed_at);
CREATE INDEX ix_contribution_key_time ON position_contributions (symbol, position_side, created_at);
CREATE INDEX ix_sp_status_strategy ON strategy_positions (status, strategy_id, realized_pnl);

-- One row per trade (a closed strategy position).
CREATE OR REPLACE VIEW strategy_trades AS
SELECT
    sp.strategy_position_id, sp.strategy_id, sp.symbol, sp.position_side, sp.exchange_position_id,
    sp.entry_price, sp.quantity,
    sp.exit_notional / NULLIF(sp.closed_quantity, 0)                    AS avg_exit_price,
    sp.gross_pnl,
    sp.entry_fee + sp.exit_fees                                         AS fees,
    sp.realized_pnl,
    sp.realized_pnl / (sp.entry_price * sp.quantity) * 100              AS pnl_pct,
    sp.close_reason,
    sp.opened_at, sp.closed_at,
    TIMESTAMPDIFF(MICROSECOND, sp.opened_at, sp.closed_at) / 1000000    AS duration_seconds
FROM strategy_positions sp
WHERE sp.status = 'closed';

-- TP/SL hit rates by the reason that finished each trade.
CREATE OR REPLACE VIEW tp_sl_hit_rates AS
SELECT
    strategy_id, symbol, position_side,
    COUNT(*)                                                            AS trades,
    SUM(close_reason = 'take_profit')                                   AS tp_exits,
    SUM(close_reason = 'stop_loss')                                     AS sl_exits,
    SUM(close_reason NOT IN ('take_profit', 'stop_loss'))               AS other_exits,
    SUM(close_reason = 'take_profit') / COUNT(*)                        AS tp_rate,
    SUM(close_reason = 'stop_loss') / COUNT(*)                          AS sl_rate,
    AVG(CASE WHEN close_reason = 'take_profit' THEN realized_pnl END)  AS avg_tp_pnl,
    AVG(CASE WHEN close_reason = 'stop_loss' THEN realized_pnl END)    AS avg_sl_pnl
FROM strategy_trades
GROUP BY strategy_id, symbol, position_side;

-- Every exchange position life, flat to flat.
CREATE OR REPLACE VIEW exchange_position_summary AS
SELECT
    ep.exchange_position_id, ep.position_key, ep.symbol, ep.position_side, ep.status,
    ep.contributions,
    (SELECT COUNT(DISTINCT c.strategy_id) FROM position_contributions c
      WHERE c.exchange_position_id = ep.exchange_position_id)           AS strategies,
    ep.max_quantity, ep.quantity AS open_quantity, ep.avg_entry_price,
    ep.realized_pnl, ep.total_fees, ep.opened_at, ep.closed_at,
    TIMESTAMPDIFF(MICROSECOND, ep.opened_at, ep.closed_at) / 1000000    AS duration_seconds
FROM exchange_positions ep;

-- Exchange positions built by more than one strategy, strategies in contribution order.
CREATE OR REPLACE VIEW multi_strategy_positions AS
SELECT
    ep.exchange_position_id, ep.position_key, ep.status,
    COUNT(DISTINCT c.strategy_id)                                       AS strategies,
    GROUP_CONCAT(c.strategy_id ORDER BY c.sequence SEPARATOR ',')       AS strategies_in_order,
    SUM(c.quantity)                                                     AS total_quantity,
    ep.realized_pnl                                                     AS total_pnl,
    ep.total_fees, ep.opened_at, ep.closed_at
FROM exchange_positions ep
JOIN position_contributions c ON c.exchange_position_id = ep.exchange_position_id
GROUP BY ep.exchange_position_id, ep.position_key, ep.status, ep.realized_pnl, ep.total_fees,
         ep.opened_at, ep.closed_at
HAVING COUNT(DISTINCT c.strategy_id) > 1;

-- Who contributed what to each exchange position, and what it earned.
CREATE OR REPLACE VIEW exchange_position_attribution AS
SELECT
    sp.exchange_position_id, ep.position_key, sp.strategy_id,
    COUNT(*)                                                            AS contributions,
    SUM(sp.quantity)                                                    AS contributed_quantity,
    SUM(sp.quantity) / (SELECT SUM(c.quantity) FROM position_contributions c
                         WHERE c.exchange_position_id = sp.exchange_position_id) AS quantity_share,
    SUM(sp.entry_price * sp.quantity) / SUM(sp.quantity)               AS avg_entry_price,
    SUM(sp.realized_pnl)                                                AS realized_pnl,
    SUM(sp.entry_fee + sp.exit_fees)                                    AS fees
FROM strategy_positions sp
JOIN exchange_positions ep ON ep.exchange_position_id = sp.exchange_position_id
GROUP BY sp.exchange_position_id, ep.position_key, sp.strategy_id;

-- Open vs closed, per strategy.
CREATE OR REPLACE VIEW position_status_summary AS
SELECT
    strategy_id, status,
    COUNT(*)                                                            AS positions,
    SUM(quantity)                                                       AS opened_quantity,
    SUM(remaining_quantity)                                             AS open_quantity,
    SUM(entry_price * remaining_quantity)                               AS open_notional,
    SUM(realized_pnl)                                                   AS realized_pnl,
    SUM(entry_fee + exit_fees)                                          AS fees
FROM strategy_positions
GROUP BY strategy_id, status;

-- Realized PnL per strategy and UTC day (partial closes count on the day they happen).
CREATE OR REPLACE VIEW daily_strategy_pnl AS
SELECT
    strategy_id, DATE(closed_at)                                        AS day,
    COUNT(*)                                                            AS closes,
    SUM(gross_pnl)                                                      AS gross_pnl,
    SUM(fee)                                                            AS fees,
    SUM(realized_pnl)                                                   AS realized_pnl
FROM position_closes
GROUP BY strategy_id, DATE(closed_at);

-- Equity curve: cumulative realized PnL over closes, its running peak (from 0) and drawdown.
CREATE OR REPLACE VIEW strategy_equity_curve AS
SELECT
    curve.strategy_id, curve.event_id, curve.closed_at, curve.realized_pnl, curve.equity,
    GREATEST(0, MAX(curve.equity) OVER (PARTITION BY curve.strategy_id ORDER BY curve.closed_at, curve.event_id
                                        ROWS UNBOUNDED PRECEDING))  AS peak,
    GREATEST(0, MAX(curve.equity) OVER (PARTITION BY curve.strategy_id ORDER BY curve.closed_at, curve.event_id
                                        ROWS UNBOUNDED PRECEDING)) - curve.equity AS drawdown
FROM (
    SELECT strategy_id, event_id, closed_at, realized_pnl,
           SUM(realized_pnl) OVER (PARTITION BY strategy_id ORDER BY closed_at, event_id
                                   ROWS UNBOUNDED PRECEDING) AS equity
    FROM position_closes
) curve;

-- Per-trade expectancy and the worst peak-to-trough drop of the equity curve.
CREATE OR REPLACE VIEW strategy_risk AS
SELECT
    t.strategy_id,
    COUNT(*)                                                            AS trades,
    AVG(t.realized_pnl)                                                 AS expectancy,
    AVG(CASE WHEN t.realized_pnl > 0 THEN t.realized_pnl END)           AS avg_win,
    AVG(CASE WHEN t.realized_pnl < 0 THEN t.realized_pnl END)           AS avg_loss,
    AVG(CASE WHEN t.realized_pnl > 0 THEN t.realized_pnl END)
      / NULLIF(-AVG(CASE WHEN t.realized_pnl < 0 THEN t.realized_pnl END), 0) AS payoff_ratio,
    (SELECT MAX(c.drawdown) FROM strategy_equity_curve c WHERE c.strategy_id = t.strategy_id) AS max_drawdown
FROM strategy_trades t
GROUP BY t.strategy_id;

-- Fees per strategy. Funding payments are not reported by the venues wired so far (paper), so
-- funding_fees is 0 until the ccxt adapter books them (issue #3).
CREATE OR REPLACE VIEW strategy_fees AS
SELECT
    strategy_id,
    SUM(entry_fee)                                                      AS entry_fees,
    SUM(exit_fees)                                                      AS exit_fees,
    CAST(0 AS DECIMAL(36,18))                                           AS funding_fees,
    SUM(entry_fee + exit_fees)                                          AS total_fees,
    SUM(entry_fee + exit_fees) / NULLIF(SUM(ABS(gross_pnl)), 0)        AS fees_per_gross_pnl
FROM strategy_positions
GROUP BY strategy_id;

-- Why signals did not execute, per strategy.
CREATE OR REPLACE VIEW signal_rejections AS
SELECT
    d.strategy_id, d.outcome, d.reason_code,
    COUNT(*)                                                            AS signals,
    COUNT(*) / (SELECT COUNT(*) FROM signal_decisions a WHERE a.strategy_id = d.strategy_id) AS share
FROM signal_decisions d
WHERE d.outcome <> 'accepted'
GROUP BY d.strategy_id, d.outcome, d.reason_code;

-- Per strategy, symbol and side.
CREATE OR REPLACE VIEW strategy_symbol_side_performance AS
SELECT
    strategy_id, symbol, position_side,
    COUNT(*)                                                            AS trades,
    SUM(realized_pnl > 0)                                               AS wins,
    SUM(realized_pnl > 0) / COUNT(*)                                    AS win_rate,
    SUM(realized_pnl)                                                   AS total_pnl,
    AVG(pnl_pct)                                                        AS avg_pnl_pct,
    SUM(CASE WHEN realized_pnl > 0 THEN realized_pnl ELSE 0 END)
      / NULLIF(-SUM(CASE WHEN realized_pnl < 0 THEN realized_pnl ELSE 0 END), 0) AS profit_factor
FROM strategy_trades
GROUP BY strategy_id, symbol, position_side;

-- One row per strategy with the measures analysts compare side by side.
CREATE OR REPLACE VIEW strategy_comparison AS
SELECT
    p.strategy_id, p.closed_positions AS trades, p.win_rate, p.profit_factor, p.total_pnl, p.total_fees,
    p.avg_pnl_pct, p.avg_duration_seconds,
    r.expectancy, r.max_drawdown, r.payoff_ratio,
    p.tp_hits / NULLIF(p.closed_positions, 0)                           AS tp_rate,
    p.sl_hits / NULLIF(p.closed_positions, 0)                           AS sl_rate
FROM strategy_performance p
LEFT JOIN strategy_risk r ON r.strategy_id = p.strategy_id;

-- Pairs of strategies entering the same key within 5 minutes of each other (each pair of
-- entries counted once). docs/analytics.md has the same query with the window as a parameter.
CREATE OR REPLACE VIEW strategy_co_entries AS
SELECT
    a.strategy_id AS strategy_a, b.strategy_id AS strategy_b,
    COUNT(*)                                                            AS co_entries,
    COUNT(DISTINCT a.exchange_position_id)                              AS shared_positions
FROM position_contributions a
JOIN position_contributions b
  ON b.symbol = a.symbol AND b.position_side = a.position_side AND b.strategy_id > a.strategy_id
 AND b.created_at BETWEEN a.created_at - INTERVAL 5 MINUTE AND a.created_at + INTERVAL 5 MINUTE
GROUP BY a.strategy_id, b.strategy_id;
