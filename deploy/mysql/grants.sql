-- Least-privilege users for tradeengine's database (issue #15). Run as an administrator AFTER
-- `tradeengine migrate` (a view must exist to be granted), and again after a migration that
-- adds a view. The placeholders are filled from the environment:
--   DB=tradeengine MIGRATE_PASSWORD=... ATTRIBUTION_PASSWORD=... ANALYST_PASSWORD=... \
--     envsubst < deploy/mysql/grants.sql | mariadb -u root -p
-- Restrict '%' to the pods' network where the server allows it; add REQUIRE SSL with TLS.

-- Migrations (the k8s migrate job): the schema's DDL, nothing outside this database.
CREATE USER IF NOT EXISTS 'te_migrate'@'%' IDENTIFIED BY '${MIGRATE_PASSWORD}';
GRANT ALL PRIVILEGES ON `${DB}`.* TO 'te_migrate'@'%';

-- The attribution consumer (run with MIGRATE_ON_START=false): writes its tables, no DDL.
CREATE USER IF NOT EXISTS 'te_attribution'@'%' IDENTIFIED BY '${ATTRIBUTION_PASSWORD}';
GRANT SELECT, INSERT, UPDATE, DELETE ON `${DB}`.* TO 'te_attribution'@'%';

-- Analysts: the views, read-only; no table, no write. The views run as their definer.
CREATE USER IF NOT EXISTS 'te_analyst'@'%' IDENTIFIED BY '${ANALYST_PASSWORD}';
GRANT SELECT ON `${DB}`.contribution_summary TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.daily_strategy_pnl TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.exchange_position_attribution TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.exchange_position_summary TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.multi_strategy_positions TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.position_status_summary TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.signal_rejections TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_co_entries TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_comparison TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_equity_curve TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_fees TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_performance TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_risk TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_symbol_side_performance TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.strategy_trades TO 'te_analyst'@'%';
GRANT SELECT ON `${DB}`.tp_sl_hit_rates TO 'te_analyst'@'%';
-- Optional: the original system's attribution query and PnL check read two tables
-- (docs/analytics.md). Uncomment to allow them.
-- GRANT SELECT ON `${DB}`.position_contributions TO 'te_analyst'@'%';
-- GRANT SELECT ON `${DB}`.exchange_positions TO 'te_analyst'@'%';
