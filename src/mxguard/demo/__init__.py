"""The STRIPTLS demonstration: one attacker, every defence, side by side (docs/design.md).

The demo runs the lab (or uses one it is given), puts the on-path attacker in front of the MX
hosts of one domain per defence into ``strip`` mode (RFC 3207 §4: the sender only upgrades
when the EHLO reply offers STARTTLS, so deleting that line is enough), and sends each domain a
message carrying a password-like line with mxguard's own ``Sender``. Then it looks at what
happened, never at what should have happened:

- the attacker's records: did the password cross the wire in plain text?
- the receivers' mailboxes: did the message arrive, and over TLS or not?
- the sender's result and the TLS-RPT session results in the store (RFC 8460 §4): which
  failure was recorded for the domain's daily report?

From these it derives each row's outcome and whether the sender behaved as a secure sender
must: an opportunistic sender delivers (and the attacker reads it: that is the attack), a
report-only MTA-STS policy delivers and reports the failure (RFC 8461 §5), and every
protecting defence (local rule, MTA-STS enforce RFC 8461 §4.2, DANE RFC 7672 §2.2, the static
list) either refuses or delivers over verified TLS, and never lets the attacker read the mail.

Acts: ``strip`` (the attack), ``honest`` (the attacker passes traffic unchanged: every policy
delivers over verified TLS) and ``tofu`` (RFC 8461 §5.1 trust on first use: the MTA-STS policy
was cached in the first act; now the attacker also deletes the ``_mta-sts`` TXT record and
breaks the policy host's HTTPS, and the cached policy still refuses).

Modules: ``model.py`` (cases, outcomes, rows and the judging rules; pure) and ``runner.py``
(the run against the lab). ``mxguard demo`` (``cli/demo.py``) renders the result. The demo is
a front end like ``cli/``: it may import the engine, the lab, the adapters and the config, and
nothing imports it but ``cli/demo.py`` and the tests. It is not part of ``lab/`` because the
lab never imports the engine (it plays the other side).
"""

from __future__ import annotations

from mxguard.demo.model import (
    ACT_TITLES,
    CASES,
    TOFU_CASE,
    Act,
    ActResult,
    Case,
    DemoError,
    DemoResult,
    EhloComparison,
    Expect,
    MessageFate,
    Row,
    classify,
    judge,
)
from mxguard.demo.runner import (
    DEFAULT_NET,
    EHLO_DOMAIN,
    MAIL_FROM,
    SMTP_TIMEOUT,
    compare_ehlo,
    demo_scenario,
    demo_settings,
    read_ehlo,
    run,
    run_case,
    run_demo,
)

__all__ = [
    "ACT_TITLES",
    "CASES",
    "DEFAULT_NET",
    "EHLO_DOMAIN",
    "MAIL_FROM",
    "SMTP_TIMEOUT",
    "TOFU_CASE",
    "Act",
    "ActResult",
    "Case",
    "DemoError",
    "DemoResult",
    "EhloComparison",
    "Expect",
    "MessageFate",
    "Row",
    "classify",
    "compare_ehlo",
    "demo_scenario",
    "demo_settings",
    "judge",
    "read_ehlo",
    "run",
    "run_case",
    "run_demo",
]
