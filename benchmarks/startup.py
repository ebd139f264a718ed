"""Start-up time of the command line against ``python -c "import torch"``, side by side.

Each round runs, in a shuffled order, ``python -c "import torch"``, ``lorkd-pl --help`` and
``lorkd-pl tasks`` as fresh processes; the table reports the median wall time of each over the rounds
and its ratio to the torch import (targets: ``--help`` ≤ 1.0×, ``tasks`` ≤ 1.5×).

Usage::

    python benchmarks/startup.py [--rounds 15] [--output FILE]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"lorkd-pl --help": 1.0, "lorkd-pl tasks": 1.5}


def commands() -> dict[str, list[str]]:
    """The timed commands (the console script next to this interpreter)."""
    script = shutil.which("lorkd-pl", path=str(Path(sys.executable).parent)) or "lorkd-pl"
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "lorkd-pl --help": [script, "--help"],
        "lorkd-pl tasks": [script, "tasks"],
    }


def measure(rounds: int) -> dict[str, float]:
    """Median seconds of each command over ``rounds`` interleaved rounds (one warm-up round first)."""
    timed = commands()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(rounds + 1):
        order = list(timed)
        random.Random(round_index).shuffle(order)
        for name in order:
            start = time.perf_counter()
            subprocess.run(timed[name], check=True, capture_output=True)
            if round_index:  # round 0 warms the file cache
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown(medians: dict[str, float], rounds: int) -> str:
    """The results table."""
    base = medians['python -c "import torch"']
    lines = [
        f"Median of {rounds} interleaved rounds, fresh processes.",
        "",
        "| command | median (s) | × `import torch` | target | met |",
        "|---|---:|---:|---:|---|",
    ]
    for name, seconds in medians.items():
        target = TARGETS.get(name)
        ratio = seconds / base
        met = "" if target is None else ("yes" if ratio <= target else "NO")
        lines.append(
            f"| `{name}` | {seconds:.3f} | {ratio:.2f} | {'' if target is None else f'≤ {target}'} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()
    table = markdown(measure(args.rounds), args.rounds)
    print(table)
    if args.output:
        Path(args.output).write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
