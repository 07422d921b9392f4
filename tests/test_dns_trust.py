"""The AD bit is trusted only from a resolver on loopback (docs/design.md; RFC 7672 §2.1).

The path to any other resolver is itself attackable, so its AD bit proves nothing: every
answer from it is insecure, and DANE is off. No network: responses are built and read.
"""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.rrset
import pytest

from mxguard.adapters.dns import DnsResolver, DnssecStatus


def validated_answer() -> tuple[dns.message.Message, dns.message.Message]:
    query = dns.message.make_query("mx.example.test", "A")
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text("mx.example.test.", 60, "IN", "A", "192.0.2.1"))
    response.flags |= dns.flags.AD  # the resolver says it validated the answer
    return query, response


@pytest.mark.parametrize(
    ("server", "trusted", "status"),
    [
        ("127.0.0.53", True, DnssecStatus.SECURE),
        ("::1", True, DnssecStatus.SECURE),
        ("192.0.2.53", False, DnssecStatus.INSECURE),
        ("2001:db8::53", False, DnssecStatus.INSECURE),
    ],
)
def test_ad_counts_only_from_a_loopback_resolver(
    server: str, trusted: bool, status: DnssecStatus
) -> None:
    resolver = DnsResolver([(server, 53)])
    assert resolver.trusted is trusted
    query, response = validated_answer()
    answer = asyncio.run(resolver._interpret("mx.example.test", "A", query, response, server, 53))
    assert answer.dnssec is status


def test_one_untrusted_resolver_makes_the_whole_set_untrusted() -> None:
    assert DnsResolver([("127.0.0.53", 53), ("192.0.2.53", 53)]).trusted is False
