-- 0008_digests: email digests. A bulk-lane notification of a type the user chose a digest for is not sent on its
-- own: the preferences stage keeps it here under the end of its window (the next local hour, 08:00 the next day,
-- or Monday 08:00, in the user's time zone), and a releaser sends one email per (user, type, window) listing the
-- items, then deletes them in the same transaction. The digest's notification id is derived from the window, so a
-- release repeated after a crash sends nothing twice; an item already answered (a delivery row exists) is never
-- held again, so a replay never puts it in a second digest.

ALTER TABLE user_notification_settings DROP CONSTRAINT user_notification_settings_digest_check;
ALTER TABLE user_notification_settings
    ADD CONSTRAINT user_notification_settings_digest_check CHECK (digest IN ('none', 'hourly', 'daily', 'weekly'));

CREATE TABLE digest_items (
    notification_id   uuid        PRIMARY KEY REFERENCES notifications (notification_id),
    user_id           text        NOT NULL,
    notification_type text        NOT NULL,
    frequency         text        NOT NULL CHECK (frequency IN ('hourly', 'daily', 'weekly')),
    window_end        timestamptz NOT NULL,
    address           text        NOT NULL CHECK (address LIKE '_%@_%'),
    request           bytea       NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX digest_items_due_idx ON digest_items (window_end, user_id, notification_type);

COMMENT ON TABLE digest_items IS
    'Notifications held for a digest email: released (one email per user, type and window) at window_end.';
COMMENT ON COLUMN digest_items.request IS 'The accepted NotificationRequest (Avro, single-object encoding).';
