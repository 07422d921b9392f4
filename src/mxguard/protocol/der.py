"""Reading DER just far enough to find a certificate's parts (RFC 5280 §4.1), without a
certificate parser: the WebPKI yes/no check hashes the issuer and subject names it finds
(webpki.py), and the lab re-signs a TBSCertificate it has changed (lab/certprofiles.py)."""

from __future__ import annotations

Item = tuple[int, bytes, bytes]  # (tag, content, the whole TLV)


def items(data: bytes) -> list[Item]:
    """The TLVs in ``data``, one after the other; single-byte tags only. ValueError for
    anything that is not such a run of TLVs."""
    found = []
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise ValueError("truncated DER")
        tag, first = data[i], data[i + 1]
        if tag & 0x1F == 0x1F:
            raise ValueError("multi-byte DER tags are not used in certificates")
        j = i + 2
        if first < 0x80:
            size = first
        else:
            count = first & 0x7F
            if not 0 < count <= 4:
                raise ValueError("unsupported DER length")
            size = int.from_bytes(data[j : j + count], "big")
            j += count
        end = j + size
        if end > len(data):
            raise ValueError("truncated DER")
        found.append((tag, data[j:end], data[i:end]))
        i = end
    return found


def tbs_fields(certificate: bytes) -> list[Item]:
    """The fields of a DER certificate's TBSCertificate, in order (the optional ``[0]``
    version first, when present). ValueError if ``certificate`` is not laid out as
    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm, signature }."""
    outer = items(certificate)
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise ValueError("not a DER certificate")
    parts = items(outer[0][1])
    if len(parts) != 3 or parts[0][0] != 0x30:
        raise ValueError("not a DER certificate")
    return items(parts[0][1])


__all__ = ["Item", "items", "tbs_fields"]
