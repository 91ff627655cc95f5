-- Core projection of the EVENTS stream. Amounts are DECIMAL, times are UTC DATETIME(6).
-- Every write is keyed by event id through processed_events, so replays change nothing.

CREATE TABLE IF NOT EXISTS processed_events (
    event_id      CHAR(36)     NOT NULL PRIMARY KEY,
    event_type    VARCHAR(32)  NOT NULL,
    stream_seq    BIGINT       NULL,
    processed_at  DATETIME(6)  NOT NULL
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS exchange_positions (
    exchange_position_id  CHAR(36)        NOT NULL PRIMARY KEY,
    position_key          VARCHAR(80)     NOT NULL,
    symbol                VARCHAR(64)     NOT NULL,
    position_side         ENUM('LONG','SHORT') NOT NULL,
    status                ENUM('open','closed') NOT NULL,
    quantity              DECIMAL(36,18)  NOT NULL,
    max_quantity          DECIMAL(36,18)  NOT NULL,
    avg_entry_price       DECIMAL(36,18)  NOT NULL,
    contributions         INT             NOT NULL DEFAULT 0,
    realized_pnl          DECIMAL(36,18)  NOT NULL DEFAULT 0,
    total_fees            DECIMAL(36,18)  NOT NULL DEFAULT 0,
    opened_at             DATETIME(6)     NOT NULL,
    closed_at             DATETIME(6)     NULL,
    updated_at            DATETIME(6)     NOT NULL,
    KEY ix_ep_symbol_side (symbol, position_side, status),
    KEY ix_ep_opened (opened_at)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS strategy_positions (
    strategy_position_id  CHAR(36)        NOT NULL PRIMARY KEY,
    strategy_id           VARCHAR(64)     NOT NULL,
    signal_id             VARCHAR(128)    NOT NULL,
    symbol                VARCHAR(64)     NOT NULL,
    position_side         ENUM('LONG','SHORT') NOT NULL,
    exchange_position_id  CHAR(36)        NOT NULL,
    status                ENUM('open','closed') NOT NULL,
    entry_price           DECIMAL(36,18)  NOT NULL,
    quantity              DECIMAL(36,18)  NOT NULL,
    remaining_quantity    DECIMAL(36,18)  NOT NULL,
    closed_quantity       DECIMAL(36,18)  NOT NULL DEFAULT 0,
    take_profit_price     DECIMAL(36,18)  NULL,
    stop_loss_price       DECIMAL(36,18)  NULL,
    confidence            DECIMAL(10,6)   NOT NULL,
    entry_fee             DECIMAL(36,18)  NOT NULL,
    exit_fees             DECIMAL(36,18)  NOT NULL DEFAULT 0,
    exit_notional         DECIMAL(36,18)  NOT NULL DEFAULT 0,
    gross_pnl             DECIMAL(36,18)  NOT NULL DEFAULT 0,
    realized_pnl          DECIMAL(36,18)  NOT NULL DEFAULT 0,
    close_reason          VARCHAR(16)     NULL,
    client_order_id       VARCHAR(36)     NOT NULL,
    exchange_order_id     VARCHAR(64)     NOT NULL,
    timeframe             VARCHAR(16)     NULL,
    metadata              JSON            NULL,
    opened_at             DATETIME(6)     NOT NULL,
    closed_at             DATETIME(6)     NULL,
    KEY ix_sp_strategy (strategy_id, status),
    KEY ix_sp_symbol_side (symbol, position_side, strategy_id),
    KEY ix_sp_exchange_position (exchange_position_id),
    KEY ix_sp_signal (strategy_id, signal_id)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS position_contributions (
    contribution_id       CHAR(36)        NOT NULL PRIMARY KEY,
    exchange_position_id  CHAR(36)        NOT NULL,
    strategy_position_id  CHAR(36)        NOT NULL,
    strategy_id           VARCHAR(64)     NOT NULL,
    symbol                VARCHAR(64)     NOT NULL,
    position_side         ENUM('LONG','SHORT') NOT NULL,
    sequence              INT             NOT NULL,
    quantity              DECIMAL(36,18)  NOT NULL,
    entry_price           DECIMAL(36,18)  NOT NULL,
    quantity_before       DECIMAL(36,18)  NOT NULL,
    quantity_after        DECIMAL(36,18)  NOT NULL,
    avg_entry_price_after DECIMAL(36,18)  NOT NULL,
    created_at            DATETIME(6)     NOT NULL,
    UNIQUE KEY ux_contribution_sequence (exchange_position_id, sequence),
    KEY ix_contribution_strategy (strategy_id, symbol, position_side)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS position_closes (
    event_id              CHAR(36)        NOT NULL PRIMARY KEY,
    strategy_position_id  CHAR(36)        NOT NULL,
    strategy_id           VARCHAR(64)     NOT NULL,
    exchange_position_id  CHAR(36)        NOT NULL,
    symbol                VARCHAR(64)     NOT NULL,
    position_side         ENUM('LONG','SHORT') NOT NULL,
    closed_quantity       DECIMAL(36,18)  NOT NULL,
    remaining_quantity    DECIMAL(36,18)  NOT NULL,
    entry_price           DECIMAL(36,18)  NOT NULL,
    exit_price            DECIMAL(36,18)  NOT NULL,
    gross_pnl             DECIMAL(36,18)  NOT NULL,
    entry_fee_share       DECIMAL(36,18)  NOT NULL,
    exit_fee              DECIMAL(36,18)  NOT NULL,
    fee                   DECIMAL(36,18)  NOT NULL,
    realized_pnl          DECIMAL(36,18)  NOT NULL,
    close_reason          VARCHAR(16)     NOT NULL,
    client_order_id       VARCHAR(36)     NOT NULL,
    exchange_order_id     VARCHAR(64)     NOT NULL,
    signal_id             VARCHAR(128)    NULL,
    closed_at             DATETIME(6)     NOT NULL,
    KEY ix_close_position (strategy_position_id),
    KEY ix_close_strategy (strategy_id, close_reason),
    KEY ix_close_exchange_position (exchange_position_id)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS signal_decisions (
    event_id               CHAR(36)       NOT NULL PRIMARY KEY,
    signal_id              VARCHAR(128)   NOT NULL,
    strategy_id            VARCHAR(64)    NOT NULL,
    symbol                 VARCHAR(64)    NOT NULL,
    action                 VARCHAR(8)     NOT NULL,
    outcome                VARCHAR(16)    NOT NULL,
    reason_code            VARCHAR(64)    NOT NULL,
    reason                 VARCHAR(1024)  NOT NULL,
    confidence             DECIMAL(10,6)  NULL,
    strategy_position_ids  JSON           NOT NULL,
    decided_at             DATETIME(6)    NOT NULL,
    KEY ix_decision_signal (strategy_id, signal_id),
    KEY ix_decision_outcome (strategy_id, outcome, reason_code)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS dead_letters (
    event_id      CHAR(36)       NOT NULL PRIMARY KEY,
    subject       VARCHAR(255)   NOT NULL,
    reason_code   VARCHAR(64)    NOT NULL,
    errors        JSON           NOT NULL,
    payload       MEDIUMTEXT     NOT NULL,
    strategy_id   VARCHAR(64)    NULL,
    received_at   DATETIME(6)    NOT NULL,
    KEY ix_dead_reason (reason_code)
) ENGINE=InnoDB;
