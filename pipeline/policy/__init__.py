"""Policies: the decisions of the pipeline's stages, as pure functions over plain data.

A stage reads a record, asks a policy, writes the outcome; the policy itself sees only decoded
Avro values (dicts) and a clock value, does no I/O, and is tested without a broker.

- intake: is a NotificationRequest valid, expired, a duplicate (given what the stage's dedup table saw)?
- preferences: which channels and addresses to send on, what is suppressed, and whether to wait for quiet hours.
- quiet_hours: the user's quiet window in their time zone, across midnight and clock changes.
"""
