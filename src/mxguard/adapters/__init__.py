"""I/O adapters: DNS, HTTPS policy fetch, SMTP client, state store. Expected network outcomes
are returned as typed results, never raised."""
