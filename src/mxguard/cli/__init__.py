"""The ``mxguard`` command line (DESIGN.md "Command-line contract").

Front ends are thin: parse arguments, call the engine, render results. Exit codes: 0 success
or valid, 1 invalid input being linted, 2 usage error, 69 permanent failure, 75 deferred.
"""

from __future__ import annotations

import click

from mxguard import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mxguard")
def main() -> None:
    """Server-to-server e-mail that a STRIPTLS attacker cannot downgrade."""


# Sub-command groups live in their own modules; they are registered here, in one place.
from mxguard.cli import dane as _dane  # noqa: E402
from mxguard.cli import sts as _sts  # noqa: E402
from mxguard.cli import tlsrpt as _tlsrpt  # noqa: E402

main.add_command(_sts.sts)
main.add_command(_dane.dane)
main.add_command(_tlsrpt.tlsrpt)
