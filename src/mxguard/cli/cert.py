"""`mxguard cert`: judge a certificate chain as the sender judges an MX host (RFC 8461 §4.2).

``mxguard cert verify`` runs the WebPKI verdict that ``send`` and ``serve postfix`` apply to MX
hosts under an MTA-STS policy (``mxguard.protocol.pkix``: OpenSSL's verifier at the system's
security level, SAN DNS names only) on a chain from a PEM file, and names every problem with
its RFC 8460 result type. Exit 0 when the chain is accepted, 1 when not, 2 for usage errors (an
unreadable or empty PEM file, a bad CA file, an unusable time).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import click

from mxguard.cli.output import emit_lint, wants_json
from mxguard.protocol import names, pkix

EXPIRY_WARNING = dt.timedelta(days=21)


@click.group()
def cert() -> None:
    """Certificate chains judged as mxguard judges an MX host's (RFC 8461 §4.2)."""


def _load_chain(path: Path) -> list[bytes]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint="--chain") from e
    ders = pkix.pem_certificates(data)
    if not ders:
        raise click.BadParameter(
            f"{path} holds no PEM certificates ('-----BEGIN CERTIFICATE-----' blocks, leaf first)",
            param_hint="--chain",
        )
    return ders


def _when(value: str | None) -> dt.datetime:
    if value is None:
        return dt.datetime.now(dt.UTC)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time such as 2027-01-31T12:00:00Z", param_hint="--at"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@cert.command("verify")
@click.option(
    "--chain",
    "chain_file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="PEM file with the chain the server presents, leaf first.",
)
@click.option("--name", required=True, metavar="HOST", help="The MX host name to check.")
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Extra trusted roots (PEM), added to the system's (default: the global --ca-file).",
)
@click.option(
    "--system-roots/--no-system-roots",
    default=True,
    help="Trust the system's CA bundle too (default: yes, as send does).",
)
@click.option("--at", "at", metavar="TIME", help="Verify at this time (ISO 8601; default: now).")
@click.option("--json", "as_json", is_flag=True, default=None, help="Machine-readable output.")
@click.pass_context
def verify(
    ctx: click.Context,
    chain_file: Path,
    name: str,
    ca_file: Path | None,
    system_roots: bool,
    at: str | None,
    as_json: bool | None,
) -> None:
    """Verify a certificate chain for an MX host as an MTA-STS sender does (WebPKI)."""
    from mxguard.cli import settings

    s = settings(ctx)
    try:
        names.normalise_host(name)
    except names.HostNameError as exc:
        raise click.BadParameter(
            f"{name[:80]!r} is not a host name: {exc}", param_hint="--name"
        ) from None
    ders = _load_chain(chain_file)
    try:
        roots = pkix.load_roots(ca_file or s.ca_file, system=system_roots)
    except pkix.CaFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--ca-file") from None
    if not roots:
        raise click.UsageError(
            "no trusted roots: the system has no CA bundle; give --ca-file (PEM roots)"
        )
    now = _when(at)
    verdict = pkix.verify_pkix(ders, name=name, roots=roots, now=now)
    presented = [pkix.summarize(d) for d in ders]
    warnings = []
    if verdict.ok and verdict.path:
        leaf_end = verdict.path[0].not_valid_after_utc
        if leaf_end - now < EXPIRY_WARNING:
            days = (leaf_end - now).days
            warnings.append(f"the certificate expires in {days} days ({leaf_end:%Y-%m-%d})")
    errors = [] if verdict.ok else [f"{verdict.result_type}: {verdict.detail}"]
    errors += [f"also: {p}" for p in verdict.problems if p != verdict.detail]
    json_out = wants_json(ctx, as_json)
    path = [pkix.summarize(pkix.der(c)) for c in verdict.path]
    fields: dict[str, Any] = {
        "name": name,
        "verified": verdict.ok,
        "result_type": verdict.result_type.value if verdict.result_type else None,
        # In text, a failure's detail is already the first error line.
        "detail": verdict.detail if verdict.ok or json_out else None,
        "security_level": pkix.default_auth_level(),
        "roots": len(roots),
    }
    if json_out:
        fields["openssl_errors"] = list(verdict.codes)
        fields["presented"] = [c.to_json() for c in presented]
        fields["path"] = [c.to_json() for c in path]
    code = emit_lint("WebPKI", fields, errors, warnings, as_json=json_out)
    if not json_out:
        for position, c in enumerate(presented):
            click.echo(f"  presented [{position}]: {c}")
        if path:
            click.echo("  path: " + " <- ".join(c.subject for c in path))
    ctx.exit(code)
