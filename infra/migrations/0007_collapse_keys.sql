-- 0007_collapse_keys: latest-wins notifications. A request may carry a collapse key (e.g. the asset of a price
-- alert); before it sends, the sender looks up the latest notification of the same user, type and key, and a task
-- that is no longer the latest ends suppressed (superseded). The partial index serves that lookup alone.

ALTER TABLE notifications ADD COLUMN collapse_key text CHECK (collapse_key <> '');

CREATE INDEX notifications_latest_by_collapse_key
    ON notifications (user_id, notification_type, collapse_key, created_at DESC, notification_id DESC)
    WHERE collapse_key IS NOT NULL;

COMMENT ON COLUMN notifications.collapse_key IS
    'NotificationRequest.collapse_key: a newer notification of the same user, type and key supersedes this one '
    'while it is unsent.';
