"""Coverage-guided fuzzing of one target of fuzz/targets.py with atheris (libFuzzer).

    scripts/fuzz TARGET [RUNS]      # e.g. scripts/fuzz sts_policy 1000000
    scripts/fuzz all [RUNS]         # every target in turn

Seeds come from fuzz/corpus/TARGET/; inputs that reach new code are added there (keep them:
tests/test_fuzz_corpus.py replays the corpus in CI). A crash is written to
fuzz/crashes/TARGET-*; copy it into the corpus once fixed, so it stays a regression test.
Not run in CI: a million executions per target take minutes each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent

with atheris.instrument_imports(include=["mxguard"]):
    import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: run.py TARGET [RUNS]; targets: {', '.join(targets.TARGETS)}")
    name = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    corpus = HERE / "corpus" / name
    crashes = HERE / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(exist_ok=True)
    target = targets.TARGETS[name]
    args = [
        sys.argv[0],
        str(corpus),
        f"-runs={runs}",
        f"-artifact_prefix={crashes}/{name}-",
        "-max_len=4096",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    atheris.Setup(args, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
