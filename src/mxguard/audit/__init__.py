"""``mxguard check``: the domain owner's audit (docs/check.md).

It answers, for a receiving domain, the question a STRIPTLS attacker asks: can mail to this
domain be downgraded today, and what exactly must change? It looks at the domain the way a
compliant sender does (the same resolver, fetch and verifiers as ``send``) and then probes
every MX address itself, without sending mail.

- ``model``: what a check found, and its JSON (``check --json``);
- ``analysis``: findings and the verdict from what was found (pure, table-tested);
- ``history``: what changed since the previous check (pure);
- ``probe``: the SMTP, TLS and report-address probes, cached across domains;
- ``auditor``: one check, and bulk runs (concurrency, store history, shared runs).
"""
