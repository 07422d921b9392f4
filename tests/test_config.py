"""Settings: every mistake in a config file is named, with the file, the key and what is right."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mxguard import config
from mxguard.cli import main

BAD = [
    ("resolvers = ['127.0.0.1']", "unknown key(s) resolvers"),
    ("resolver = ['localhost:53']", "is not ADDRESS[:PORT]"),
    ("resolver = ['127.0.0.1:99999']", "is not ADDRESS[:PORT]"),
    ("smtp_port = 0", "is not a port number"),
    ("https_port = 'https'", "is not a port number"),
    ("ca_file = 5", "ca_file: expected a path"),
    ("fetch_timeout = 600", "fetch_timeout: expected seconds"),
    ("local_rules = 'example.com'", "local_rules: expected a table"),
    ("store = ''", "store: expected a store URL"),
    ("resolver = [", "is not valid TOML"),
    ("json = 'yes'", "json: expected true or false"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_config_mistakes_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mxguard.toml"
    path.write_text(text + "\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_config_values_are_read(tmp_path: Path) -> None:
    path = tmp_path / "mxguard.toml"
    path.write_text(
        'resolver = ["127.0.0.1:5353", "[::1]"]\nsmtp_port = 2525\nfetch_timeout = 2.5\n'
        '[local_rules]\n"bank.example" = "verified"\n'
    )
    s = config.load(path)
    assert s.resolvers == (("127.0.0.1", 5353), ("::1", 53))
    assert (s.smtp_port, s.fetch_timeout) == (2525, 2.5)
    assert s.local_rules == {"bank.example": "verified"}


def test_flags_beat_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mxguard.toml"
    path.write_text("smtp_port = 2525\nhttps_port = 4443\n")
    seen = {}

    @main.command("show-settings-for-test")
    def show() -> None:
        from click import get_current_context

        from mxguard.cli import settings

        s = settings(get_current_context())
        seen.update(smtp=s.smtp_port, https=s.https_port)

    try:
        result = CliRunner().invoke(
            main,
            ["--config", str(path), "--smtp-port", "25", "show-settings-for-test"],
            env={"MXGUARD_SMTP_PORT": "26", "MXGUARD_HTTPS_PORT": "444"},
        )
        assert result.exit_code == 0, result.output
        assert seen == {"smtp": 25, "https": 444}
    finally:
        main.commands.pop("show-settings-for-test")


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.toml"), "lab", "scenarios"])
    assert result.exit_code == 2
    assert "cannot read config file" in result.output
