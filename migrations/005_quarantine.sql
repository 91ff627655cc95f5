-- Events MySQL refused for good (a value out of a column's range, a broken reference): kept
-- here with the error instead of blocking the projection. The stream still holds them;
-- after a fix, ops can delete the row and replay (docs/runbooks/quarantined-events.md).
CREATE TABLE IF NOT EXISTS quarantined_events (
    event_id        VARCHAR(64)   NOT NULL PRIMARY KEY,
    event_type      VARCHAR(32)   NOT NULL,
    stream_seq      BIGINT        NULL,
    error           TEXT          NOT NULL,
    payload         MEDIUMTEXT    NOT NULL,
    quarantined_at  DATETIME(6)   NOT NULL
);
