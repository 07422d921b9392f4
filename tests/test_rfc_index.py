"""docs/rfc-index.md is generated from the code's RFC citations and must match them.

A citation added, moved or removed without running ``python scripts/rfc_index.py`` fails the
first test. The others pin down what counts as a citation. Their examples write the word as
``<RFC>``, so that they do not show up in the index as citations themselves.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_script() -> ModuleType:
    name = "rfc_index"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "rfc_index.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


rfc_index = _load_script()


def _cited(template: str) -> list[str]:
    """The citations in ``template`` as "8461 §4.1" (or "7505" without a section)."""
    text = template.replace("<RFC>", "RFC")
    return [
        f"{rfc} §{section}" if section else str(rfc) for rfc, section, _ in rfc_index.cited(text)
    ]


def test_docs_rfc_index_is_up_to_date() -> None:
    index = ROOT / "docs" / "rfc-index.md"
    expected = rfc_index.render(ROOT)
    actual = index.read_text(encoding="utf-8") if index.exists() else ""
    if actual != expected:  # no diff of two long texts: the message says what to do
        pytest.fail(rfc_index.STALE, pytrace=False)


def test_check_mode_exits_1_with_the_command_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "src" / "pkg" / "mod.py").write_text(
        '"""Module."""\n\n\ndef f() -> None:\n    """<RFC> 8461 §4.1."""\n'.replace("<RFC>", "RFC")
    )
    monkeypatch.setattr(rfc_index, "ROOT", tmp_path)
    assert rfc_index.main(["--check"]) == 1
    assert capsys.readouterr().err.strip() == (
        "docs/rfc-index.md is out of date: run python scripts/rfc_index.py"
    )
    assert rfc_index.main([]) == 0
    assert "`pkg.mod:f`" in (tmp_path / "docs" / "rfc-index.md").read_text()
    assert rfc_index.main(["--check"]) == 0


@pytest.mark.parametrize(
    ("rule", "text", "expected"),
    [
        ("a section sign and a number", "see <RFC> 8461 §4.1.", ["8461 §4.1"]),
        ("the word Section, either case", "<RFC> 8460 section 4.4", ["8460 §4.4"]),
        ("no section: the RFC as a whole", "<RFC> 7505 says", ["7505"]),
        ("no space after the word", "<RFC>3339 dates", ["3339"]),
        ("a list repeats the sign", "<RFC> 8461 §3.1, §3.2", ["8461 §3.1", "8461 §3.2"]),
        ("a range names both ends", "<RFC> 7672 §3.1.1-§3.2", ["7672 §3.1.1", "7672 §3.2"]),
        ("and joins two sections", "<RFC> 8460 §4.3.1 and §4.3.2", ["8460 §4.3.1", "8460 §4.3.2"]),
        ("a number without the sign is not a section", "<RFC> 8460 §4, 5 days", ["8460 §4"]),
        (
            "the next RFC is a citation of its own",
            "<RFC> 8461 §2, <RFC> 7672 §2",
            ["8461 §2", "7672 §2"],
        ),
        ("a wrapped comment goes on", "# <RFC> 1035\n# §3.2.1)", ["1035 §3.2.1"]),
        ("a full stop is not part of the section", "<RFC> 8461 §5.", ["8461 §5"]),
        ("a bare section sign is not a citation", "as §5.1 says", []),
    ],
)
def test_what_counts_as_a_citation(rule: str, text: str, expected: list[str]) -> None:
    assert _cited(text) == expected, rule


def test_citations_are_filed_under_the_enclosing_function_and_test(tmp_path: Path) -> None:
    source = textwrap.dedent(
        '''\
        """Module docstring: <RFC> 8461 §3.1."""

        LIMIT = 10  # <RFC> 8461 §3.3

        class Policy:
            def matches(self) -> bool:
                # <RFC> 8461 §4.1
                return True
        '''
    )
    test_source = textwrap.dedent(
        """\
        import pytest

        @pytest.mark.parametrize("x", ["<RFC> 8461 §4.1"])
        def test_rule(x):
            def helper():
                return "<RFC> 8461 §4.2"

        class TestGroup:
            def test_member(self):
                assert "<RFC> 8461 §5"

        def fixture_helper():
            return "<RFC> 8461 §5"
        """
    )
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    (tmp_path / "src" / "pkg" / "__init__.py").write_text(source.replace("<RFC>", "RFC"))
    (tmp_path / "tests" / "test_x.py").write_text(test_source.replace("<RFC>", "RFC"))
    places = {(c.section, c.place) for c in rfc_index.collect(tmp_path)}
    assert places == {
        ("3.1", "pkg (module)"),
        ("3.3", "pkg:LIMIT"),
        ("4.1", "pkg:Policy.matches"),
        ("4.1", "tests/test_x.py::test_rule"),
        ("4.2", "tests/test_x.py::test_rule"),
        ("5", "tests/test_x.py::TestGroup::test_member"),
        ("5", "tests/test_x.py:fixture_helper"),
    }
