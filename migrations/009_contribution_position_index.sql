-- The attribution consumer brings a closed slice's contribution up to date by its strategy
-- position (UPDATE ... WHERE strategy_position_id IN ...): without this index each batch scanned
-- the whole table, growing with every trade, and locked rows of positions another consumer
-- (ATTRIBUTION_PARTITIONS) was writing, which deadlocked them.
CREATE INDEX ix_contribution_position ON position_contributions (strategy_position_id);
