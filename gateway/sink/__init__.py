"""Kinesis side: batching, limits, retries, aggregation."""
