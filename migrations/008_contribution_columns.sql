-- The original system's attribution query runs as it was written (issue #17): its column names
-- on position_contributions. The key, entry and quantity are the row's own (virtual columns);
-- status, PnL and exit price are the contributed slice's, kept by the attribution consumer as
-- the slice closes.
ALTER TABLE position_contributions
    ADD COLUMN exchange_position_key VARCHAR(80) AS (CONCAT(symbol, '_', position_side)) VIRTUAL,
    ADD COLUMN contribution_entry_price DECIMAL(36,18) AS (entry_price) VIRTUAL,
    ADD COLUMN contribution_quantity DECIMAL(36,18) AS (quantity) VIRTUAL,
    ADD COLUMN status ENUM('open','closed') NOT NULL DEFAULT 'open',
    ADD COLUMN contribution_pnl DECIMAL(36,18) NOT NULL DEFAULT 0,
    ADD COLUMN exit_price DECIMAL(36,18) NULL;

UPDATE position_contributions c
JOIN strategy_positions sp ON sp.strategy_position_id = c.strategy_position_id
SET c.status = sp.status,
    c.contribution_pnl = sp.realized_pnl,
    c.exit_price = IF(sp.closed_quantity > 0, sp.exit_notional / sp.closed_quantity, NULL);
