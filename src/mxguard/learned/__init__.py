"""Learned security levels and the stripping alarm (docs/learned.md).

For a receiving domain that publishes neither DANE nor MTA-STS, nothing tells a sender that
a session without TLS is wrong. This package remembers, per recipient domain and per MX host
and address, the strongest level seen (``protocol/levels.py``), notices a session below it (a
drop), raises one alarm when many domains lose STARTTLS together (an attacker near the
sender), and, in ``enforce`` mode, turns a learned level into a floor that the engine's
precedence applies below every published policy and local rule.

- ``config.py``: the ``[learned]`` settings;
- ``model.py``: the rules, pure (levels of a session, drops, floors, decay, the alarm window);
- ``learner.py``: the rules over the store (``LearnedLevels``), with logging and counters.
"""
