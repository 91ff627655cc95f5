-- Risk limits and the kill switch (issue #15). A decision refused by a limit keeps the limit
-- and the figure the signal would have reached; every halt, resume and flatten is a row.
ALTER TABLE signal_decisions
    ADD COLUMN risk_limit DECIMAL(36,18) NULL,
    ADD COLUMN risk_figure DECIMAL(36,18) NULL;

CREATE TABLE IF NOT EXISTS control_actions (
    event_id          CHAR(36)        NOT NULL PRIMARY KEY,
    command_id        VARCHAR(128)    NOT NULL,
    command           VARCHAR(16)     NOT NULL,
    strategy_id       VARCHAR(64)     NULL,
    symbol            VARCHAR(64)     NULL,
    outcome           VARCHAR(16)     NOT NULL,
    cause             VARCHAR(32)     NOT NULL,
    reason            VARCHAR(1024)   NOT NULL,
    closed_positions  JSON            NOT NULL,
    halted            JSON            NOT NULL,
    applied_at        DATETIME(6)     NOT NULL,
    KEY ix_control_applied (applied_at)
) ENGINE=InnoDB;
