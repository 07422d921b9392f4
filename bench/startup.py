"""Benchmark: what a script or an MTA pays per message when it runs `mxguard send` once per
message, next to a bare `swaks --tls` to the same lab MX host; and `mxguard --version`.

Each command runs `--runs` times (default 7) as a fresh process; the medians are compared
as a ratio from one run. Needs root (the lab's port 25) and swaks (apt-get install swaks).

    .venv/bin/python bench/startup.py [--runs 7] [--net 127.71] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mxguard as mxguard_package
from mxguard.lab.lab import Lab
from mxguard.lab.scenario import named

DOMAIN = "nopolicy.test"  # STARTTLS offered, no policy: the same session for both tools
MX = "mx.nopolicy.test"


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr.decode()[-400:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--net", default="127.71")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    swaks = shutil.which("swaks")
    if swaks is None:
        raise SystemExit("swaks is not installed: apt-get install swaks")
    mxguard = str(Path(sys.executable).with_name("mxguard"))
    # As installed by pip, which compiles every module: with PYTHONDONTWRITEBYTECODE set (as in
    # some shells and CI images) an editable install would compile mxguard's sources at every
    # start, which no installed copy does.
    package = Path(mxguard_package.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    with tempfile.TemporaryDirectory() as tmp, Lab(named("standard"), net=args.net) as lab:
        env = {**os.environ, "XDG_STATE_HOME": tmp}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        address = lab.address_of(MX)
        commands = {
            "mxguard --version": [mxguard, "--version"],
            "mxguard send": [
                mxguard, "--config", str(lab.config_file), "send", "--from", "bench@client.test",
                "--to", f"postmaster@{DOMAIN}",
            ],
            "swaks --tls": [
                swaks, "--server", address, "--port", str(lab.ports.smtp), "--tls",
                "--from", "bench@client.test", "--to", f"postmaster@{DOMAIN}", "--silent", "2",
            ],
        }  # fmt: skip
        for command in commands.values():  # warm the page cache and the resolver
            timed(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):  # interleaved, so that load affects all alike
            for name, command in commands.items():
                times[name].append(timed(command, env))
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratio = medians["mxguard send"] / medians["swaks --tls"]
    load = os.getloadavg()[0]
    print(f"median of {args.runs} runs each, 1-minute load {load:.2f}:")
    for name, value in medians.items():
        print(f"  {name:<18} {value * 1000:7.1f} ms")
    print(f"  mxguard send / swaks --tls: {ratio:.2f}x")
    if args.json:
        result: dict[str, Any] = {
            "runs": args.runs, "load": load, "median_s": medians, "ratio_send_swaks": ratio,
            "samples_s": times,
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
