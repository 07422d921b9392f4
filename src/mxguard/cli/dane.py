"""`mxguard dane`: DANE for SMTP: match certificate chains against TLSA records (RFC 7672).

``mxguard dane match`` checks a certificate chain (PEM, leaf first, as the server sends it)
against one or more TLSA records, with the rules of RFC 7672 §3 implemented in
``mxguard.protocol.dane``. Exit 0 when the chain is authenticated, 1 when not, 2 for usage
errors (an unparsable record, an unreadable or empty PEM file).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from mxguard.cli.output import emit_lint, wants_json
from mxguard.protocol.dane import Tlsa, TlsaError, classify, parse_tlsa, verify_chain


@click.group()
def dane() -> None:
    """DANE for SMTP: match certificate chains against TLSA records (RFC 7672)."""


def _parse_records(values: tuple[str, ...]) -> list[Tlsa]:
    records = []
    for value in values:
        try:
            records.append(parse_tlsa(value))
        except TlsaError as e:
            raise click.BadParameter(f"{value!r}: {e}", param_hint="--tlsa") from e
    return records


def _load_chain(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="--chain") from e
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise click.BadParameter(
            f"{path} holds no PEM certificates ('-----BEGIN CERTIFICATE-----' blocks, leaf first)",
            param_hint="--chain",
        ) from e
    return chain


@dane.command("match")
@click.option(
    "--tlsa",
    "tlsa_texts",
    multiple=True,
    required=True,
    metavar="'U S M HEX'",
    help="A TLSA record in presentation form (repeat for an RRset).",
)
@click.option(
    "--chain",
    "chain_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM file with the chain the server presents, leaf first.",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    metavar="HOST",
    help="Reference name (the MX host; repeatable). Checked for DANE-TA only.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def match(
    ctx: click.Context,
    tlsa_texts: tuple[str, ...],
    chain_file: Path,
    names: tuple[str, ...],
    as_json: bool,
) -> None:
    """Verify a certificate chain against TLSA records (RFC 7672 §3)."""
    as_json = wants_json(ctx, as_json)
    records = _parse_records(tlsa_texts)
    chain = _load_chain(chain_file)
    # The edge reads the clock; the protocol layer is handed the time.
    verdict = verify_chain(records, chain, names=names, now=dt.datetime.now(dt.UTC))
    tlsa_set = classify(records)
    reasons = {id(u.record): u.reason for u in tlsa_set.unusable}
    shown: list[dict[str, Any]] = [
        {"tlsa": r.to_text(), "usable": id(r) not in reasons, "reason": reasons.get(id(r))}
        for r in records
    ]
    errors = [] if verdict.ok else [f"{verdict.result_type}: {verdict.detail}"]
    warnings = [f"ignored {u.record}: {u.reason}" for u in tlsa_set.unusable]
    fields: dict[str, Any] = {
        "method": verdict.method,
        "matched": verdict.matched.to_text() if verdict.matched else None,
        "result_type": verdict.result_type.value if verdict.result_type else None,
        "detail": verdict.detail,
        "records": shown if as_json else [f"{s['tlsa']}" for s in shown],
    }
    ctx.exit(emit_lint("DANE match", fields, errors, warnings, as_json=as_json))
