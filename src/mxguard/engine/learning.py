"""The resolver with learned levels (docs/learned.md): ``resolve()``, then the learned floor.

``Resolver.resolve`` (engine/resolve.py) decides from what DNS, MTA-STS, the list and the local
rules say; this subclass then asks the ``Learner`` what the domain's current MX hosts have
shown before and lets ``precedence.apply_learned`` add it: the weakest rule, applied last,
which only ever raises requirements. ``deliver()`` then enforces the result like any other
policy (an enforced floor that STARTTLS does not meet defers the message), and every front
end that resolves (``mxguard policy``, ``serve postfix``, ``send``) shows the same thing.
"""

from __future__ import annotations

from typing import Any

from mxguard.adapters.store import StoreError
from mxguard.engine.policy import DeliveryPolicy, Status
from mxguard.engine.precedence import apply_learned
from mxguard.engine.resolve import Resolver
from mxguard.learned.learner import Learner
from mxguard.learned.model import FloorState, LearnedFloor


class LearnedResolver(Resolver):
    """A ``Resolver`` whose policies carry (and, in enforce mode, apply) learned levels."""

    def __init__(self, *args: Any, learner: Learner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.learner = learner

    async def resolve(self, domain: str) -> DeliveryPolicy:
        policy = await super().resolve(domain)
        if policy.status is Status.FAIL or not policy.mx:
            return policy
        mx_set = [(name, m.addresses) for m in policy.mx for name in (m.host, m.canonical) if name]
        try:
            floor = await self.learner.floor(policy.domain, mx_set)
        except StoreError as exc:
            mode = self.learner.settings.mode_for(policy.domain)
            floor = LearnedFloor(policy.domain, None, FloorState.NONE, mode, error=str(exc))
        return apply_learned(policy, floor)
