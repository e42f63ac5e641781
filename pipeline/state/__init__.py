"""State outside Kafka: the PostgreSQL pool and its migrations (db, migrate), the deliveries ledger and the delivery
log read from it (deliveries, delivery_log), and what lives in Redis (breaker, ratelimit, redis_client)."""
