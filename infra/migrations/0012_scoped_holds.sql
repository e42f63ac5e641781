-- 0012_scoped_holds: a hold and a digest item belong to the pipeline that made them (its NOTIFY_TOPIC_PREFIX).
--
-- Two pipelines on one database with different topic prefixes (the tests' rigs do this; so would a staging and a
-- load-test pipeline sharing a cluster) each ran a releaser that took every due row and produced it to its own
-- topics: one pipeline sent another's held messages. held_messages.topic now holds the physical topic name (prefix
-- included) and each releaser asks only for its own; with the default empty prefix the physical name is the
-- logical one, so rows written before stay valid. digest_items gets the prefix of the pipeline that held the item,
-- and each pipeline's releaser reads only its own.

ALTER TABLE digest_items ADD COLUMN topic_prefix text NOT NULL DEFAULT '';
DROP INDEX digest_items_due_idx;
CREATE INDEX digest_items_due_idx ON digest_items (topic_prefix, window_end, user_id, notification_type);

COMMENT ON TABLE held_messages IS
    'Messages held until due_at, then produced to topic (the physical name, topic prefix included) and deleted.';
COMMENT ON COLUMN held_messages.topic IS
    'The physical topic to release to (NOTIFY_TOPIC_PREFIX + the logical name): a releaser takes only its own.';
COMMENT ON COLUMN digest_items.topic_prefix IS
    'NOTIFY_TOPIC_PREFIX of the pipeline that held the item: only that pipeline''s releaser sends its digest.';
