-- 0003_held_messages: durable holds for messages that must wait (quiet hours, a rate limiter outage).
--
-- A stage that must not send now writes the message here (inserted once per hold_id) and moves on; a timer in
-- the stage's workers releases due rows to their topic and deletes them in the same transaction only after
-- Kafka acknowledged, so a hold survives restarts and is never lost. SKIP LOCKED lets every worker release
-- without two of them releasing the same row.

CREATE TABLE held_messages (
    hold_id        text        PRIMARY KEY,
    topic          text        NOT NULL,
    message_key    bytea,
    message_value  bytea       NOT NULL,
    reason         text        NOT NULL CHECK (reason IN ('quiet_hours', 'rate_limiter_unavailable')),
    notification_id uuid,
    due_at         timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX held_messages_due_idx ON held_messages (topic, due_at);

COMMENT ON TABLE held_messages IS
    'Messages held until due_at, then produced to topic (a logical topic of topics/) and deleted.';
