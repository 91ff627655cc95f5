-- Analysts' views (DESIGN §5). Definitions are in docs/analytics.md.
-- A "trade" is a closed strategy position; PnL is net of the entry-fee share and exit fees.

CREATE OR REPLACE VIEW strategy_performance AS
SELECT
    sp.strategy_id,
    COUNT(*)                                                    AS total_positions,
    SUM(sp.status = 'open')                                     AS open_positions,
    SUM(sp.status = 'closed')                                   AS closed_positions,
    COALESCE(SUM(hits.tp_closes > 0), 0)                        AS tp_hits,
    COALESCE(SUM(hits.sl_closes > 0), 0)                        AS sl_hits,
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
LEFT JOIN (
    SELECT strategy_position_id,
           SUM(close_reason = 'take_profit') AS tp_closes,
           SUM(close_reason = 'stop_loss')   AS sl_closes
    FROM position_closes
    GROUP BY strategy_position_id
) hits ON hits.strategy_position_id = sp.strategy_position_id
GROUP BY sp.strategy_id;

CREATE OR REPLACE VIEW contribution_summary AS
SELECT
    c.strategy_id,
    c.symbol,
    c.position_side,
    COUNT(*)                                            AS contributions,
    SUM(c.quantity)                                     AS total_quantity,
    SUM(c.quantity * c.entry_price) / SUM(c.quantity)   AS avg_entry_price,
    SUM(sp.realized_pnl)                                AS total_pnl,
    AVG(CASE WHEN sp.status = 'closed'
             THEN sp.realized_pnl / (sp.entry_price * sp.quantity) * 100 END)
                                                        AS avg_pnl_pct
FROM position_contributions c
JOIN strategy_positions sp ON sp.strategy_position_id = c.strategy_position_id
GROUP BY c.strategy_id, c.symbol, c.position_side;
