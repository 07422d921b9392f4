#!/usr/bin/env python3
"""Write docs/rfc-index.md: each RFC section the code cites, where, and which tests cite it.

Usage::

    python scripts/rfc_index.py          # (re)write docs/rfc-index.md
    python scripts/rfc_index.py --check  # exit 1 when docs/rfc-index.md is out of date

A citation is the word ``RFC``, the RFC number and, optionally, sections: ``§4.2``,
``Section 4.2``, lists and ranges that repeat the sign (``§3.1, §3.2``, ``§3.1.1-§3.2``) and
citations wrapped over a line break, comment markers included. A bare ``§5.1`` with no RFC
number before it is not counted: which RFC it means is only clear to a reader of the text
around it. Only ``.py`` files under src/ and tests/ are read.

Each citation is filed under the innermost function or class around it (found with ``ast``;
decorators belong to the function they decorate, so a ``parametrize`` table counts for its
test), under the name of a module-level assignment, or under the module itself. Line numbers
are left out on purpose: the index changes when a citation is added, removed or moved to
another function, not whenever a line above it is edited.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX = Path("docs") / "rfc-index.md"
COMMAND = "python scripts/rfc_index.py"
STALE = f"{INDEX.as_posix()} is out of date: run {COMMAND}"

_NUMBER = r"\d+(?:\.\d+)*"
# `[\s#]*` lets a citation continue on the next line of a comment or a docstring.
_GAP = r"[\s#]*"
_CITATION = re.compile(
    rf"\bRFC[ \t]?(?P<rfc>\d{{3,5}})\b"
    rf"(?:,?{_GAP}(?:§|[Ss]ections?[ \t]+){_GAP}(?P<first>{_NUMBER})"
    rf"(?P<more>(?:{_GAP}(?:,|and|or|/|-|–){_GAP}§{_GAP}{_NUMBER})*))?"
)
_MORE = re.compile(rf"§{_GAP}({_NUMBER})")

# Titles of the RFCs the code cites; an RFC missing here is listed by its number alone.
TITLES: dict[int, str] = {
    1034: "Domain Names: Concepts and Facilities",
    1035: "Domain Names: Implementation and Specification",
    2034: "SMTP Service Extension for Returning Enhanced Error Codes",
    2181: "Clarifications to the DNS Specification",
    2308: "Negative Caching of DNS Queries (DNS NCACHE)",
    3164: "The BSD syslog Protocol",
    3207: "SMTP Service Extension for Secure SMTP over Transport Layer Security",
    3225: "Indicating Resolver Support of DNSSEC",
    3339: "Date and Time on the Internet: Timestamps",
    3463: "Enhanced Mail System Status Codes",
    3834: "Recommendations for Automatic Responses to Electronic Mail",
    3986: "Uniform Resource Identifier (URI): Generic Syntax",
    4033: "DNS Security Introduction and Requirements",
    4034: "Resource Records for the DNS Security Extensions",
    4035: "Protocol Modifications for the DNS Security Extensions",
    4616: "The PLAIN SASL Mechanism",
    4954: "SMTP Service Extension for Authentication",
    5280: "Internet X.509 Public Key Infrastructure Certificate and CRL Profile",
    5321: "Simple Mail Transfer Protocol",
    5322: "Internet Message Format",
    5612: "Enterprise Number for Documentation Use",
    5758: "Internet X.509 PKI: Additional Algorithms and Identifiers for DSA and ECDSA",
    5890: "IDNA: Definitions and Document Framework",
    5891: "IDNA: Protocol",
    6066: "TLS Extensions: Extension Definitions",
    6068: "The 'mailto' URI Scheme",
    6125: "Domain-Based Application Service Identity in PKIX Certificates (TLS)",
    6531: "SMTP Extension for Internationalized Email",
    6585: "Additional HTTP Status Codes",
    6605: "Elliptic Curve Digital Signature Algorithm (DSA) for DNSSEC",
    6698: "DANE Transport Layer Security (TLS) Protocol: TLSA",
    6761: "Special-Use Domain Names",
    6840: "Clarifications and Implementation Notes for DNSSEC",
    6891: "Extension Mechanisms for DNS (EDNS(0))",
    7218: "Adding Acronyms to Simplify Conversations about DANE",
    7493: "The I-JSON Message Format",
    7505: 'A "Null MX" No Service Resource Record for Domains That Accept No Mail',
    7525: "Recommendations for Secure Use of TLS and DTLS",
    7671: "The DANE Protocol: Updates and Operational Guidance",
    7672: "SMTP Security via Opportunistic DANE TLS",
    7766: "DNS Transport over TCP: Implementation Requirements",
    8017: "PKCS #1: RSA Cryptography Specifications Version 2.2",
    8020: "NXDOMAIN: There Really Is Nothing Underneath",
    8145: "Signaling Trust Anchor Knowledge in DNSSEC",
    8410: "Algorithm Identifiers for Ed25519, Ed448, X25519 and X448 in the Internet X.509 PKI",
    8460: "SMTP TLS Reporting",
    8461: "SMTP MTA Strict Transport Security (MTA-STS)",
    8689: "SMTP Require TLS Option",
    8914: "Extended DNS Errors",
    8996: "Deprecating TLS 1.0 and TLS 1.1",
    9110: "HTTP Semantics",
    9112: "HTTP/1.1",
    9525: "Service Identity in TLS",
}


@dataclass(frozen=True, order=True)
class Citation:
    """One RFC section cited at one place. ``section`` is "" when no section is given."""

    rfc: int
    section: str
    place: str  # e.g. `mxguard.engine.sts:StsResolver.lookup` or `tests/test_x.py::test_y`


def cited(text: str) -> Iterator[tuple[int, str, int]]:
    """(rfc, section, offset) for every citation in ``text``; "" for a citation without one."""
    for m in _CITATION.finditer(text):
        rfc = int(m["rfc"])
        if m["first"] is None:
            yield rfc, "", m.start()
            continue
        yield rfc, m["first"], m.start()
        for more in _MORE.finditer(m["more"] or ""):
            yield rfc, more[1], m.start()


@dataclass(frozen=True)
class _Scope:
    start: int  # first line, decorators included
    end: int
    names: tuple[str, ...]  # qualified name, outermost first
    test: tuple[str, ...] | None  # for a test function (or inside one): its pytest id parts


def _scopes(tree: ast.Module) -> list[_Scope]:
    """Every function, class and module-level assignment, with its line range."""
    out: list[_Scope] = []

    def visit(node: ast.AST, names: tuple[str, ...], test: tuple[str, ...] | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = (*names, child.name)
                is_test = (
                    test is None
                    and not isinstance(child, ast.ClassDef)
                    and child.name.startswith("test")
                    and all(n.startswith("Test") for n in names)
                )
                inner_test = inner if is_test else test
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append(_Scope(start, child.end_lineno or child.lineno, inner, inner_test))
                visit(child, inner, inner_test)
            else:  # statements that hold definitions: if, try, with, ...
                visit(child, names, test)

    visit(tree, (), None)
    for stmt in tree.body:
        targets: list[ast.expr] = []
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign):
            targets = [stmt.target]
        names = [t.id for t in targets if isinstance(t, ast.Name)]
        if names:
            out.append(_Scope(stmt.lineno, stmt.end_lineno or stmt.lineno, (names[0],), None))
    return out


def _innermost(scopes: Sequence[_Scope], line: int) -> _Scope | None:
    around = [s for s in scopes if s.start <= line <= s.end]
    return max(around, key=lambda s: (s.start, len(s.names)), default=None)


def _module_name(path: Path) -> str:
    """`src/mxguard/engine/sts.py` -> `mxguard.engine.sts` (a package is named by its folder)."""
    parts = list(path.relative_to("src").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def scan_file(root: Path, path: Path) -> list[Citation]:
    """The citations in one file; ``path`` is relative to ``root`` (src/... or tests/...)."""
    text = (root / path).read_text(encoding="utf-8")
    scopes = _scopes(ast.parse(text, filename=str(path)))
    in_tests = path.parts[0] == "tests"
    found: set[Citation] = set()
    for rfc, section, offset in cited(text):
        line = text.count("\n", 0, offset) + 1
        scope = _innermost(scopes, line)
        if in_tests:
            if scope is not None and scope.test is not None:
                place = "::".join((path.as_posix(), *scope.test))
            elif scope is not None:
                place = f"{path.as_posix()}:{'.'.join(scope.names)}"
            else:
                place = f"{path.as_posix()} (module)"
        else:
            module = _module_name(path)
            place = f"{module}:{'.'.join(scope.names)}" if scope else f"{module} (module)"
        found.add(Citation(rfc, section, place))
    return sorted(found)


def _python_files(root: Path, folder: str) -> list[Path]:
    return sorted(
        p.relative_to(root)
        for p in (root / folder).rglob("*.py")
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def collect(root: Path) -> list[Citation]:
    """Every citation in src/ and tests/, sorted."""
    citations: list[Citation] = []
    for folder in ("src", "tests"):
        for path in _python_files(root, folder):
            citations += scan_file(root, path)
    return sorted(citations)


def _section_key(section: str) -> tuple[int, ...]:
    return tuple(int(n) for n in section.split(".")) if section else ()


def _heading(rfc: int) -> str:
    title = TITLES.get(rfc)
    return f"RFC {rfc}: {title}" if title else f"RFC {rfc}"


def render(root: Path = ROOT) -> str:
    """The text of docs/rfc-index.md for the sources under ``root``."""
    citations = collect(root)
    by_rfc: dict[int, dict[str, tuple[set[str], set[str]]]] = {}
    for c in citations:
        code, tests = by_rfc.setdefault(c.rfc, {}).setdefault(c.section, (set(), set()))
        (tests if c.place.startswith("tests/") else code).add(c.place)

    lines = [
        "# RFC index",
        "",
        "<!-- Generated by scripts/rfc_index.py: do not edit by hand. -->",
        "",
        f"Generated by `scripts/rfc_index.py` from the RFC citations in `src/` and `tests/`; "
        f"regenerate it with `{COMMAND}` after adding, moving or removing a citation. "
        f"`{COMMAND} --check` (and `tests/test_rfc_index.py`) fail while it is out of date.",
        "",
        "For each RFC and section: the code that cites it (`module:function`, the innermost "
        "function or class around the citation, or the module-level name or module docstring) "
        'and the tests that cite the same section. "No section" collects citations of the RFC '
        "as a whole. Citations without an RFC number (a bare `§5.1`) are not counted. The rules "
        "themselves, in prose, are in [rfc-notes.md](rfc-notes.md).",
        "",
        "| RFC | sections cited | places in code | places in tests |",
        "|---|---|---|---|",
    ]
    for rfc in sorted(by_rfc):
        sections = by_rfc[rfc]
        numbered = sum(1 for s in sections if s)
        code_places = {p for code, _ in sections.values() for p in code}
        test_places = {p for _, tests in sections.values() for p in tests}
        lines.append(
            f"| [{_heading(rfc)}](#rfc-{rfc}) | {numbered} | {len(code_places)} "
            f"| {len(test_places)} |"
        )
    for rfc in sorted(by_rfc):
        lines += ["", f'<a id="rfc-{rfc}"></a>', "", f"## {_heading(rfc)}"]
        for section in sorted(by_rfc[rfc], key=_section_key):
            code, tests = by_rfc[rfc][section]
            lines += ["", f"### RFC {rfc} §{section}" if section else f"### RFC {rfc}, no section"]
            lines += ["", "Code:" if code else "Code: none; only tests cite it."]
            lines += _bullets(code)
            lines += ["", "Tests:" if tests else "Tests: none."]
            lines += _bullets(tests)
    return "\n".join(lines) + "\n"


def _bullets(places: Iterable[str]) -> list[str]:
    return [f"- `{p}`" for p in sorted(places)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"do not write; exit 1 when {INDEX.as_posix()} differs from what would be written",
    )
    args = parser.parse_args(argv)
    text = render(ROOT)
    target = ROOT / INDEX
    if args.check:
        try:
            current = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            print(STALE, file=sys.stderr)
            return 1
        return 0
    target.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
