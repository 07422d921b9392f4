"""The lab's authoritative DNS server: serves ``dns.zone.Zone`` objects over UDP and TCP.

Just enough of an authoritative name server (RFC 1034 §4.3.2, RFC 1035 §4.2) for a
validating resolver to walk the lab's chain of trust:

- answers from the deepest zone it holds that encloses the query name; a DS query at a zone
  apex is answered by the parent zone (RFC 4035 §3.1.4.1);
- referrals (AA clear, NS and DS or the NSEC proving no DS) for delegated zones it does not
  hold (RFC 4035 §3.1.4);
- CNAME chains followed through every zone it holds (RFC 1034 §4.3.2 step 3a);
- with DO set (RFC 3225): RRSIGs with every RRset, and NSEC proofs for negative answers —
  NXDOMAIN with the NSEC covering the name and the one covering the wildcard (RFC 4035
  §3.1.3.2), NODATA with the name's own NSEC (§3.1.3.1), and an empty non-terminal as NODATA
  with the NSEC that covers it (RFC 4035 §3.1.3.2 / RFC 8020: a name with descendants exists);
- REFUSED outside its zones, FORMERR for undecodable queries, NOTIMP for other opcodes;
- UDP answers that do not fit the requester's EDNS payload size (512 without EDNS, RFC 1035
  §4.2.1; RFC 6891 §6.2.5) are sent empty with TC set; TCP (RFC 7766) gets the full answer.

Wildcard synthesis is not implemented: lab zones have no wildcards.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

log = logging.getLogger(__name__)

_MAX_CNAME_CHAIN = 8  # bound the work one query can cause
_UDP_MIN_PAYLOAD = 512  # RFC 1035 §4.2.1
_OUR_PAYLOAD = 1232  # the common EDNS buffer size recommendation (DNS flag day 2020)
_TCP_MAX_MESSAGE = 65535  # RFC 1035 §4.2.2: two-octet length prefix
_TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP client may stay silent (RFC 7766 §6.2.3)

_NSEC = dns.rdatatype.NSEC
_RRSIG = dns.rdatatype.RRSIG
_SOA = dns.rdatatype.SOA
_NS = dns.rdatatype.NS
_DS = dns.rdatatype.DS
_CNAME = dns.rdatatype.CNAME
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA


@dataclass(frozen=True)
class _Zone:
    """A read-only index of one zone: absolute owner names, NSEC owners in canonical order."""

    origin: dns.name.Name
    nodes: Mapping[dns.name.Name, tuple[dns.rdataset.Rdataset, ...]]
    names: tuple[dns.name.Name, ...]  # every owner name, canonical order (RFC 4034 §6.1)
    nsec_owners: tuple[dns.name.Name, ...]

    @classmethod
    def of(cls, zone: dns.zone.Zone) -> _Zone:
        if zone.origin is None:
            raise ValueError("a zone without an origin cannot be served")
        origin = zone.origin
        nodes: dict[dns.name.Name, tuple[dns.rdataset.Rdataset, ...]] = {}
        for name, node in zone.nodes.items():
            absolute = name.derelativize(origin)
            rdatasets = tuple(node.rdatasets)
            if rdatasets:
                nodes[absolute] = rdatasets
        if not any(r.rdtype == _SOA for r in nodes.get(origin, ())):
            raise ValueError(f"zone {origin} has no SOA record at its apex")
        names = tuple(sorted(nodes))  # dns.name.Name orders canonically
        nsec = tuple(n for n in names if any(r.rdtype == _NSEC for r in nodes[n]))
        return cls(origin, nodes, names, nsec)

    def get(
        self, name: dns.name.Name, rdtype: int, covers: int = dns.rdatatype.NONE
    ) -> dns.rdataset.Rdataset | None:
        for rds in self.nodes.get(name, ()):
            if rds.rdtype == rdtype and rds.covers == covers:
                return rds
        return None

    def rrset(self, name: dns.name.Name, rdtype: int, dnssec: bool) -> list[dns.rrset.RRset]:
        """``name``/``rdtype`` as an RRset, followed by its RRSIGs when ``dnssec``."""
        out: list[dns.rrset.RRset] = []
        rds = self.get(name, rdtype)
        if rds is None:
            return out
        out.append(_to_rrset(name, rds))
        if dnssec:
            sigs = self.get(name, _RRSIG, rdtype)
            if sigs is not None:
                out.append(_to_rrset(name, sigs))
        return out

    def exists(self, name: dns.name.Name) -> bool:
        """The name owns data or is an empty non-terminal (RFC 8020: it has descendants)."""
        if name in self.nodes:
            return True
        i = bisect.bisect_right(self.names, name)
        # Descendants sort right after their ancestor in canonical order (RFC 4034 §6.1).
        return i < len(self.names) and self.names[i].is_subdomain(name)

    def covering_nsec(self, name: dns.name.Name) -> dns.name.Name | None:
        """The owner of the NSEC at or before ``name`` in canonical order."""
        i = bisect.bisect_right(self.nsec_owners, name)
        return self.nsec_owners[i - 1] if i > 0 else None

    def delegation(self, qname: dns.name.Name, qtype: int) -> dns.name.Name | None:
        """The highest zone cut between the apex and ``qname``, if any (RFC 1034 §4.3.2)."""
        depth = len(self.origin.labels)
        for n in range(depth + 1, len(qname.labels) + 1):
            cut = qname.split(n)[1]
            if self.get(cut, _NS) is None:
                continue
            # The parent is authoritative for the DS at the cut itself (RFC 4035 §3.1.4.1).
            if cut == qname and qtype == _DS:
                return None
            return cut
        return None


def _to_rrset(name: dns.name.Name, rds: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rds.rdclass, rds.rdtype, rds.covers)
    for rdata in rds:
        rrset.add(rdata, rds.ttl)
    return rrset


class AuthServer:
    """An authoritative server for ``zones`` at ``address``:``port`` (UDP and TCP).

    ``queries`` counts the messages received (including undecodable ones).
    """

    def __init__(self, zones: Mapping[str, dns.zone.Zone], address: str, port: int) -> None:
        self.address = address
        self.port = port
        self.queries = 0
        self._zones: dict[dns.name.Name, _Zone] = {}
        self.update(zones)
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def update(self, zones: Mapping[str, dns.zone.Zone]) -> None:
        """Serve ``zones`` from now on; the index is built first and swapped in one step."""
        index = {}
        for z in zones.values():
            entry = _Zone.of(z)
            index[entry.origin] = entry
        self._zones = index

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(self.address, self.port)
        )
        self._transport = transport
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, self.address, self.port)
        except OSError:
            transport.close()
            self._transport = None
            raise

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._tcp is not None:
            self._tcp.close()
            # Closing a client's transport ends its read loop with EOF; cancelling the task
            # instead would make asyncio log the cancellation as an error.
            for writer in list(self._tcp_clients.values()):
                writer.close()
            await asyncio.gather(*self._tcp_clients, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # owned here, so stop() can end idle connections
            self._tcp_clients[task] = writer
            task.add_done_callback(lambda t: self._tcp_clients.pop(t, None))
        await _tcp_loop(self, reader, writer)

    # --- wire handling ------------------------------------------------------------------

    def handle_wire(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The reply to one received message, or None when nothing should be sent."""
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # any undecodable input: FORMERR if we can name the query id
            return _formerr(wire)
        if query.flags & dns.flags.QR:
            return None  # never answer responses (avoids loops between servers)
        try:
            response = self.answer(query)
        except Exception:
            log.exception("lab DNS server failed on %s", query.question)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        if not udp:
            limit = _TCP_MAX_MESSAGE  # to_wire() would otherwise stop at the EDNS payload size
        elif query.edns >= 0:
            limit = max(_UDP_MIN_PAYLOAD, query.payload)
        else:
            limit = _UDP_MIN_PAYLOAD
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # RFC 2181 §9: a truncated reply tells the client to retry over TCP (over TCP, this
            # only happens beyond 64 KiB, and the client gets an empty TC answer too).
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The authoritative response to ``query`` (no transport concerns)."""
        response = dns.message.make_response(query, our_payload=_OUR_PAYLOAD)
        dnssec = query.edns >= 0 and bool(query.ednsflags & dns.flags.DO)
        if dnssec:
            response.ednsflags |= dns.flags.DO  # RFC 3225 §3: echo DO
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        zones = self._zones  # one snapshot for the whole answer
        qname, qtype = q.name, q.rdtype
        zone = _find_zone(zones, qname, qtype)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        seen: set[dns.name.Name] = set()
        for _ in range(_MAX_CNAME_CHAIN):
            seen.add(qname)
            target = _answer_in_zone(zone, qname, qtype, dnssec, response, zones)
            if target is None or target in seen:
                return response
            next_zone = _find_zone(zones, target, qtype)
            if next_zone is None:
                return response  # the resolver follows the CNAME elsewhere itself
            qname, zone = target, next_zone
        return response


def _find_zone(
    zones: Mapping[dns.name.Name, _Zone], qname: dns.name.Name, qtype: int
) -> _Zone | None:
    # A DS record lives in the parent zone (RFC 4035 §3.1.4.1): at a zone apex, answer from
    # the enclosing zone when one is held.
    if qtype == _DS and qname in zones and len(qname.labels) > 1:
        above = _deepest_zone(zones, qname.parent())
        if above is not None:
            return above
    return _deepest_zone(zones, qname)


def _deepest_zone(zones: Mapping[dns.name.Name, _Zone], name: dns.name.Name) -> _Zone | None:
    # Walk up from the name: one dict lookup per label, however many zones are held.
    while True:
        zone = zones.get(name)
        if zone is not None:
            return zone
        if len(name.labels) <= 1:
            return None
        name = name.parent()


def _answer_in_zone(
    zone: _Zone,
    qname: dns.name.Name,
    qtype: int,
    dnssec: bool,
    response: dns.message.Message,
    zones: Mapping[dns.name.Name, _Zone],
) -> dns.name.Name | None:
    """Add the answer for ``qname`` to ``response``; return a CNAME target to follow next."""
    cut = zone.delegation(qname, qtype)
    if cut is not None:
        _referral(zone, cut, dnssec, response, zones)
        return None
    if qname in zone.nodes:
        if qtype == dns.rdatatype.ANY:
            for rds in zone.nodes[qname]:
                if rds.rdtype != _RRSIG or dnssec:
                    response.answer.append(_to_rrset(qname, rds))
            return None
        found = zone.rrset(qname, qtype, dnssec)
        if found:
            response.answer += found
            return None
        cname = zone.rrset(qname, _CNAME, dnssec)
        if cname:
            response.answer += cname
            target = cname[0][0]
            return target.target  # type: ignore[no-any-return]
        _negative(zone, qname, dnssec, response, nxdomain=False)
        return None
    _negative(zone, qname, dnssec, response, nxdomain=not zone.exists(qname))
    return None


def _negative(
    zone: _Zone,
    qname: dns.name.Name,
    dnssec: bool,
    response: dns.message.Message,
    *,
    nxdomain: bool,
) -> None:
    # RFC 2308 §3: SOA in the authority section gives the negative-caching TTL.
    _add_unique(response.authority, zone.rrset(zone.origin, _SOA, dnssec))
    if nxdomain:
        response.set_rcode(dns.rcode.NXDOMAIN)
    if not dnssec:
        return
    proofs: list[dns.name.Name | None] = []
    if qname in zone.nodes:
        proofs.append(qname)  # RFC 4035 §3.1.3.1: the name's NSEC shows the missing type
    else:
        # NXDOMAIN (RFC 4035 §3.1.3.2) or an empty non-terminal: the NSEC covering the name.
        proofs.append(zone.covering_nsec(qname))
        if nxdomain:
            encloser = qname.parent()
            while encloser != zone.origin and not zone.exists(encloser):
                encloser = encloser.parent()
            # ... and the NSEC proving that no wildcard at the closest encloser exists.
            proofs.append(zone.covering_nsec(dns.name.Name(("*", *encloser.labels))))
    for owner in proofs:
        if owner is not None:
            _add_unique(response.authority, zone.rrset(owner, _NSEC, True))


def _referral(
    zone: _Zone,
    cut: dns.name.Name,
    dnssec: bool,
    response: dns.message.Message,
    zones: Mapping[dns.name.Name, _Zone],
) -> None:
    # RFC 1034 §4.3.2 step 3b, RFC 4035 §3.1.4: NS (never signed, not authoritative), then the
    # signed DS or the NSEC proving there is none.
    response.flags &= ~dns.flags.AA
    ns = zone.get(cut, _NS)
    assert ns is not None
    response.authority.append(_to_rrset(cut, ns))
    if dnssec:
        ds = zone.rrset(cut, _DS, True)
        response.authority += ds or zone.rrset(cut, _NSEC, True)
    for rdata in ns:
        target: dns.name.Name = rdata.target
        glue_zone = _find_zone(zones, target, _A)
        if glue_zone is None:
            continue
        for rdtype in (_A, _AAAA):
            _add_unique(response.additional, glue_zone.rrset(target, rdtype, False))


def _add_unique(section: list[dns.rrset.RRset], rrsets: list[dns.rrset.RRset]) -> None:
    for rrset in rrsets:
        if not any(
            r.name == rrset.name and r.rdtype == rrset.rdtype and r.covers == rrset.covers
            for r in section
        ):
            section.append(rrset)


def _formerr(wire: bytes) -> bytes | None:
    if len(wire) < 12:
        return None  # not even a header: nothing to reply to (RFC 1035 §4.1.1)
    (query_id, flags) = struct.unpack("!HH", wire[:4])
    if flags & dns.flags.QR:
        return None
    response = dns.message.Message(id=query_id)
    response.flags = dns.flags.QR
    response.set_opcode(dns.opcode.from_flags(flags))
    response.set_rcode(dns.rcode.FORMERR)
    return response.to_wire()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: AuthServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport; cast.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.server.handle_wire(data, udp=True)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("lab DNS server UDP error: %s", exc)


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    try:
        async with asyncio.timeout(_TCP_IDLE_TIMEOUT):
            header = await reader.readexactly(2)
            (length,) = struct.unpack("!H", header)
            return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None


async def _tcp_loop(
    server: AuthServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while (wire := await _read_message(reader)) is not None:
            reply = server.handle_wire(wire, udp=False)
            if reply is None:
                continue
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


__all__ = ["AuthServer"]
