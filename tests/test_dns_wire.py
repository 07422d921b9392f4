"""Loopback resolvers share one UDP socket; answers are read without building whole messages.

``DnsResolver`` sends the queries to a resolver on loopback over one connected UDP socket
(``_UdpChannel``) and reads plain answers with ``_read_response``. Both must take exactly
what a fresh socket per query and ``dns.message.from_wire`` took: the same ``DnsAnswer``
for every kind of answer, nothing that does not answer the question asked, TCP when the
answer is truncated. No lab: a scripted resolver on this suite's own loopback address.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxguard.adapters.dns import DnsOutcome, DnsResolver, _name, _read_response

HOST = "127.72.53.1"  # this suite's own address for its scripted resolver


def response(
    name: str, rdtype: str, *records: str, rcode: int = 0, ad: bool = False
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    r = dns.message.make_response(query)
    r.set_rcode(rcode)
    if ad:
        r.flags |= dns.flags.AD
    for text in records:
        owner, ttl, kind, data = text.split(" ", 3)
        section = r.authority if kind == "SOA" or rcode == dns.rcode.NXDOMAIN else r.answer
        section.append(dns.rrset.from_text(owner, int(ttl), "IN", kind, data))
    return r


CASES = [
    response("a.test", "MX", "a.test. 300 MX 10 mx.b.test.", "a.test. 200 MX 20 mx2.b.test."),
    response("a.test", "A", "a.test. 60 CNAME b.test.", "b.test. 30 A 192.0.2.1", ad=True),
    response("_mta-sts.a.test", "TXT", '_mta-sts.a.test. 300 TXT "v=STSv1; " "id=7"'),
    response("nx.test", "A", "test. 3600 SOA ns.test. h.test. 1 2 3 4 300", rcode=3),
    response("a.test", "AAAA", "a.test. 3600 SOA ns.test. h.test. 1 2 3 4 30"),
    response("a.test", "TLSA"),
    response("sf.test", "A", rcode=dns.rcode.SERVFAIL),
]


@pytest.mark.parametrize("msg", CASES, ids=[str(c.question[0]) for c in CASES])
def test_an_answer_read_lean_means_what_dnspython_reads(msg: dns.message.Message) -> None:
    resolver = DnsResolver([("127.0.0.1", 53)])
    q = msg.question[0]
    name, kind = q.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(q.rdtype)
    wire = msg.to_wire()

    def interpret(r: object) -> object:
        return asyncio.run(resolver._interpret(name, kind, None, r, "127.0.0.1", 53))  # type: ignore[arg-type]

    assert interpret(_read_response(wire)) == interpret(dns.message.from_wire(wire))
    # As _UdpChannel's caller reads it: the question (checked by the channel) is skipped and
    # owners pointing at it are the name asked for; the meaning is the same.
    qsize = len(q.name.to_wire())
    lean = _read_response(wire, q.name, qsize)
    assert interpret(lean) == interpret(dns.message.from_wire(wire))
    for rrs in getattr(lean, "answer", ())[:1]:
        assert rrs.name is q.name  # dnspython compresses the first owner to the question


def test_owners_written_out_in_full_are_read_not_assumed() -> None:
    """An owner that is not a pointer to the question is read, whatever it says: a
    resolver that writes names uncompressed, or another owner than the name asked for."""
    header = bytes.fromhex("1234 8180 0001 0002 0000 0001")
    qname = dns.name.from_text("a.test")
    question = qname.to_wire() + b"\x00\x01\x00\x01"
    other = dns.name.from_text("b.test")
    record = b"\x00\x01\x00\x01" + (60).to_bytes(4, "big") + b"\x00\x04"
    # uncompressed owner a.test, then an owner b.test that the question does not name
    wire = header + question + qname.to_wire() + record + bytes([192, 0, 2, 1])
    wire += other.to_wire() + record + bytes([192, 0, 2, 2])
    wire += b"\x00" + b"\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"  # OPT, root owner
    resolver = DnsResolver([("127.0.0.1", 53)])

    def interpret(r: object) -> object:
        return asyncio.run(resolver._interpret("a.test", "A", None, r, "127.0.0.1", 53))  # type: ignore[arg-type]

    lean = _read_response(wire, qname, len(qname.to_wire()))
    assert [rrs.name for rrs in lean.answer] == [qname, other]
    assert interpret(lean) == interpret(dns.message.from_wire(wire))
    assert [str(r.address) for r in interpret(lean).records] == ["192.0.2.1"]  # type: ignore[attr-defined]


def test_a_response_cut_short_after_the_question_is_read_by_dnspython() -> None:
    qname = dns.name.from_text("a.test")
    wire = bytes.fromhex("1234 8180 0001 0001 0000 0000") + qname.to_wire() + b"\x00\x01\x00\x01"
    with pytest.raises(dns.exception.DNSException):
        _read_response(wire, qname, len(qname.to_wire()))  # what dnspython says is wrong


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[dns.message.Message], list[bytes]]], int]]:
    """A UDP resolver on HOST answering each query with what a script returns for it."""
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def start(script: Callable[[dns.message.Message], list[bytes]]) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((HOST, 0))
        sock.settimeout(0.1)
        socks.append(sock)

        def serve() -> None:
            while not stop.is_set():
                try:
                    data, peer = sock.recvfrom(4096)
                except TimeoutError:
                    continue
                for out in script(dns.message.from_wire(data)):
                    sock.sendto(out, peer)

        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        port: int = sock.getsockname()[1]
        return port

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=5)
    for s in socks:
        s.close()


def answer_to(query: dns.message.Message, address: str) -> dns.message.Message:
    r = dns.message.make_response(query)
    r.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", address))
    return r


def test_queries_share_one_socket_and_only_the_real_answer_is_taken(scripted) -> None:  # type: ignore[no-untyped-def]
    peers: set[tuple[str, int]] = set()

    def script(query: dns.message.Message) -> list[bytes]:
        wrong_id = answer_to(query, "192.0.2.66")
        wrong_id.id = (query.id + 1) % 65536
        other = dns.message.make_query("other.test", "A")
        other.id = query.id
        other_question = answer_to(other, "192.0.2.67")
        # Before the answer: one for another ID, one with this ID for another question.
        return [
            wrong_id.to_wire(),
            other_question.to_wire(),
            answer_to(query, "192.0.2.1").to_wire(),
        ]

    port = scripted(script)
    resolver = DnsResolver([(HOST, port)], timeout=2)

    async def many() -> list[object]:
        got = await asyncio.gather(*(resolver.query(f"h{i}.test", "A") for i in range(20)))
        peers.update(c.sock.getsockname() for c in resolver._channels.values())
        resolver.close()
        return list(got)

    for answer in asyncio.run(many()):
        assert answer.outcome is DnsOutcome.OK  # type: ignore[attr-defined]
        assert [str(r.address) for r in answer.records] == ["192.0.2.1"]  # type: ignore[attr-defined]
    assert len(peers) == 1  # twenty queries, one socket


def test_no_answer_is_a_timeout(scripted) -> None:  # type: ignore[no-untyped-def]
    port = scripted(lambda q: [])
    answer = asyncio.run(DnsResolver([(HOST, port)], timeout=0.3).query("quiet.test", "A"))
    assert answer.outcome is DnsOutcome.ERROR and "DNS timeout" in answer.detail


def test_query_ids_are_16_bit_spread_and_not_shared_with_a_forked_child() -> None:
    from mxguard.adapters.dns import _QueryIds

    ids = _QueryIds()
    got = [ids() for _ in range(6000)]  # more than one pool of 2,048
    assert all(0 <= i < 65536 for i in got)
    assert len(set(got)) > 5500  # 6,000 draws from 65,536: about 5,740 distinct
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the IDs it draws next
        os.write(write, b",".join(str(ids()).encode() for _ in range(50)))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = [int(x) for x in os.read(read, 65536).split(b",")]
    os.close(read)
    parent = [ids() for _ in range(50)]
    assert child != parent  # with a shared pool they would be the same 50 IDs


def test_concurrent_lookups_of_one_name_share_one_query_when_caching(scripted) -> None:  # type: ignore[no-untyped-def]
    # A burst of cold lookups for domains with one MX host asks for its records once.
    asked: list[str] = []

    def script(query: dns.message.Message) -> list[bytes]:
        asked.append(query.question[0].name.to_text())
        time.sleep(0.05)  # the answer takes a while: the other lookups arrive meanwhile
        return [answer_to(query, "192.0.2.1").to_wire()]

    port = scripted(script)

    async def burst(cache: bool) -> list[object]:
        resolver = DnsResolver([(HOST, port)], timeout=2, cache=cache)
        lookups = [asyncio.ensure_future(resolver.query("mx.shared.test", "A")) for _ in range(20)]
        await asyncio.sleep(0.01)
        lookups[0].cancel()  # one caller gives up: the others still get their answer
        got = await asyncio.gather(*lookups[1:])
        resolver.close()
        return list(got)

    for answer in asyncio.run(burst(cache=True)):
        assert [str(r.address) for r in answer.records] == ["192.0.2.1"]  # type: ignore[attr-defined]
    assert asked == ["mx.shared.test."]
    asked.clear()
    asyncio.run(burst(cache=False))  # without the cache every lookup is its own query
    assert len(asked) == 20


_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=63)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_LABEL, min_size=1, max_size=6) | st.lists(st.just("a" * 63), min_size=4, max_size=5)
)
def test_a_plain_name_built_from_its_labels_is_the_name_from_text_parses(labels: list[str]) -> None:
    text = ".".join(labels)
    try:
        expected = dns.name.from_text(text)
    except dns.exception.DNSException:  # over 255 octets: from_text says so, and so must _name
        with pytest.raises(dns.exception.DNSException):
            _name(text)
        return
    qname, canonical = _name(text)
    assert qname == expected and qname.to_wire() == expected.to_wire()
    assert canonical == text


@pytest.mark.parametrize(
    "text", ["a\\.b.test", "a\\032b.test", "x.test.", "a..test", "A.test", "a" * 64 + ".test"]
)
def test_a_name_that_is_not_plain_is_left_to_from_text(text: str) -> None:
    try:
        expected = dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        with pytest.raises(type(exc)):
            _name(text)
        return
    qname, canonical = _name(text)
    assert qname == expected
    assert canonical == dns.name.from_text(text).to_text(omit_final_dot=True).lower()
