"""Sending TLS reports (RFC 8460 §4, §5): aggregation from the store, delivery, retries."""
