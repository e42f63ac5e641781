"""Kafka: the client factory (clients), the one serializer (serde) and its schema history (schemas), the topic
catalogue and its plan (topics, topic_plan), and the producer upstream services use (upstream)."""
