-- Transactional outbox for user settings: the settings API writes user_notification_settings and the encoded
-- UserSettings record in one transaction; a relay publishes outbox rows to the compacted user-settings topic
-- and marks them published only after Kafka acknowledged. PostgreSQL and the topic cannot diverge: a failed
-- database write publishes nothing, and a failed publish is retried until it succeeds (the preferences
-- table applies versions in order and ignores stale ones, so a re-publish is harmless).

CREATE TABLE settings_outbox (
    id           bigserial   PRIMARY KEY,
    topic        text        NOT NULL CHECK (topic <> ''),  -- the physical user-settings topic (with prefix)
    user_id      text        NOT NULL CHECK (user_id <> ''),
    version      bigint      NOT NULL CHECK (version >= 0),
    payload      bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error   text
);

CREATE INDEX settings_outbox_unpublished ON settings_outbox (topic, id) WHERE published_at IS NULL;

COMMENT ON TABLE settings_outbox IS
    'UserSettings records (Avro, the wire format of the user-settings topic) waiting to be published, in id '
    'order; published_at is set once Kafka acknowledged. Published rows may be pruned after a day.';
