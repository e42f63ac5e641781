-- 0009_push_devices: push per device. A push delivery is one provider call per device token, so each of its rows in
-- notification_attempts is one device's outcome (outcome, response_status, error_code, error_payload); these columns
-- say which device: its platform and a fingerprint of its token (the first 16 hex digits of the token's SHA-256,
-- never the token itself, which is a credential to push to the user). Both NULL for SMS and email, and for push
-- attempts logged before this migration. A retry goes only to the devices that did not accept and did not fail for
-- good: the sender stores that reduced DeviceTask in deliveries.task (pipeline/policy/push.py).

ALTER TABLE notification_attempts
    ADD COLUMN device_platform    text CHECK (device_platform IN ('android', 'ios', 'web')),
    ADD COLUMN device_fingerprint text CHECK (device_fingerprint ~ '^[0-9a-f]{16}$'),
    ADD CONSTRAINT notification_attempts_device_whole
        CHECK ((device_platform IS NULL) = (device_fingerprint IS NULL));

COMMENT ON COLUMN notification_attempts.device_platform IS
    'Push: the platform of the device this call went to (DeviceToken.platform); NULL for SMS and email.';
COMMENT ON COLUMN notification_attempts.device_fingerprint IS
    'Push: the device token''s fingerprint, the first 16 hex digits of its SHA-256 (never the raw token).';
