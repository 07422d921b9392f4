"""Every input the fuzzer kept (fuzz/corpus/<target>/) replayed through its target.

The corpus holds the seeds (real records, policies, replies, reports) and whatever atheris
found that reached new code, crashes included once fixed; each must raise nothing but its
parser's named error. Fuzzing itself runs outside CI (scripts/fuzz); this keeps what it found.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402


def _corpus(name: str) -> list[Path]:
    return sorted(p for p in (FUZZ / "corpus" / name).glob("*") if p.is_file())


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_corpus_inputs_raise_only_the_parsers_named_error(name: str) -> None:
    inputs = _corpus(name)
    assert inputs, f"fuzz/corpus/{name}/ is empty: seed it with real inputs"
    for path in inputs:
        try:
            targets.TARGETS[name](path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"fuzz/corpus/{name}/{path.name}: {exc!r}") from exc
