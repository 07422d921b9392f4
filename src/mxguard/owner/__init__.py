"""For domain owners: publishing MTA-STS and serving it (the receiving side's tools).

``publish`` turns a domain's MX set into a policy and the DNS record that announces it, checks
the domain before ``enforce`` and computes when a withdrawn policy may be removed (RFC 8461
§3.1, §3.2, §8.3); ``mta_sts_server`` is the HTTPS server of ``mta-sts.<domain>`` that serves
those files (RFC 8461 §3.3). The audit of what is live is ``mxguard.audit``; this package only
uses it.
"""
