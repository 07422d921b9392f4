"""One policy as Postfix would be told it: ``serve postfix --query``, and the translation the
server shares with it.

``policy_answer`` turns a resolved ``DeliveryPolicy`` into the answer (``answers.py`` does the
translation; this adds the static list's MX patterns, which live in the engine's resolver).
``query`` resolves one key with an open engine, without the server's cache or budget.
Touches the engine (its resolver: DNS, the MTA-STS cache) and nothing else.
"""

from __future__ import annotations

from typing import Any

from mxguard.engine.context import Engine
from mxguard.engine.policy import DeliveryPolicy, Source
from mxguard.postfix import answers
from mxguard.postfix.answers import Answer, KeyKind, Options


def policy_answer(e: Engine, domain: str, policy: DeliveryPolicy, options: Options) -> Answer:
    """The answer for ``policy``, resolved for ``domain`` by ``e``."""
    patterns: tuple[str, ...] = ()
    if policy.source is Source.LIST and e.resolver.policy_list is not None:
        listed = e.resolver.policy_list.lookup(domain)
        patterns = listed.mxs if listed is not None else ()
    return answers.policy_answer(policy, options, list_patterns=patterns)


async def query(e: Engine, key: str, options: Options | None = None) -> tuple[Answer, Any]:
    """``serve postfix --query``: the answer for ``key`` and the policy behind it (or None).

    The same engine and translation as the server, without cache or budget.
    """
    options = options or Options()
    parsed = answers.parse_key_bytes(key.encode("utf-8", "surrogateescape"))
    if isinstance(parsed, Answer):
        return parsed, None
    immediate = answers.key_answer(parsed, e.resolver.local_rules)
    if immediate is not None or parsed.kind is not KeyKind.DOMAIN:
        return immediate or answers.NOTFOUND, None
    policy = await e.resolver.resolve(parsed.name)
    return policy_answer(e, parsed.name, policy, options), policy
