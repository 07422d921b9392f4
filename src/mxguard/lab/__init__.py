"""The lab: a simulated mail internet on loopback (DNSSEC zones, Unbound, MTA-STS policy hosts,
SMTP receivers, a STRIPTLS attacker), for the tests, ``mxguard lab`` and ``mxguard demo``."""
