-- strategy_performance in one scan of strategy_positions (no join to position_closes), so it
-- stays fast at millions of positions (bench/analytics_scale.py). A TP or SL close always closes
-- the whole remaining slice, so "the trade ended on a TP/SL" is the final close_reason.

CREATE OR REPLACE VIEW strategy_performance AS
SELECT
    sp.strategy_id,
    COUNT(*)                                                    AS total_positions,
    SUM(sp.status = 'open')                                     AS open_positions,
    SUM(sp.status = 'closed')                                   AS closed_positions,
    SUM(sp.close_reason = 'take_profit')                        AS tp_hits,
    SUM(sp.close_reason = 'stop_loss')                          AS sl_hits,
    SUM(sp.status = 'closed' AND sp.realized_pnl > 0)           AS winning_trades,
    SUM(sp.status = 'closed' AND sp.realized_pnl < 0)           AS losing_trades,
    SUM(sp.status = 'closed' AND sp.realized_pnl > 0) / NULLIF(SUM(sp.status = 'closed'), 0)
                                                                AS win_rate,
    SUM(sp.realized_pnl)                                        AS total_pnl,
    SUM(sp.entry_fee + sp.exit_fees)                            AS total_fees,
    AVG(CASE WHEN sp.status = 'closed'
             THEN sp.realized_pnl / (sp.entry_price * sp.quantity) * 100 END)
                                                                AS avg_pnl_pct,
    SUM(CASE WHEN sp.status = 'closed' AND sp.realized_pnl > 0 THEN sp.realized_pnl ELSE 0 END)
      / NULLIF(-SUM(CASE WHEN sp.status = 'closed' AND sp.realized_pnl < 0 THEN sp.realized_pnl ELSE 0 END), 0)
                                                                AS profit_factor,
    AVG(CASE WHEN sp.status = 'closed'
             THEN TIMESTAMPDIFF(MICROSECOND, sp.opened_at, sp.closed_at) / 1000000 END)
                                                                AS avg_duration_seconds
FROM strategy_positions sp
GROUP BY sp.strategy_id;

-- Covering index: the view reads only these columns, in strategy order.
CREATE INDEX ix_sp_performance ON strategy_positions
    (strategy_id, status, close_reason, realized_pnl, entry_fee, exit_fees, entry_price, quantity, opened_at, closed_at);
