"""Benchmark: examples/hf_trainer.py with resumable.trainer's two lines against the same script without them, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/trainer_overhead.py [--steps 1500] [--rounds 5] [--save_steps 25 100000]

For each --save_steps value, two programs, each started fresh, in alternation (round 1: A B, round 2: A B, ...):
  A  the script as the usual guide writes it (`--plain`: get_last_checkpoint, the Trainer's own saves and rotation);
  B  the same script with ResumableCallback and checkpoint_to_resume (each save committed with a manifest, fsynced).
Both save at the last step as well (the Trainer does with save_strategy "steps"); a --save_steps above --steps
measures the per-step cost alone. The time is the Trainer's own train_runtime (from its first step to the end of
train(), saves included), so start-up does not blur a few-percent difference. Prints a Markdown table:
steps/s per program (median of the rounds) and B / A per round.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "hf_trainer.py"
RUNTIME = re.compile(r"'train_runtime': '?([0-9.]+)")


def steps_per_second(steps: int, save_steps: int, plain: bool, output_dir: str) -> float:
    command = [sys.executable, str(EXAMPLE), "--output_dir", output_dir, "--max_steps", str(steps), "--save_steps", str(save_steps)]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}  # the checkout's resumable package, as `pip install .` would give
    result = subprocess.run(command + (["--plain"] if plain else []), capture_output=True, text=True, timeout=3600, env=environment)
    runtimes = RUNTIME.findall(result.stdout)
    if result.returncode != 0 or not runtimes:
        raise SystemExit(f"a benchmark program failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return steps / float(runtimes[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save_steps", type=int, nargs="+", default=[25, 100000])
    args = parser.parse_args()
    print(f"{args.steps} steps, {args.rounds} rounds, threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| save_steps | program | steps/s (median) | each round | with the two lines / plain: median (each round) |")
    print("|---|---|---|---|---|")
    for save_steps in args.save_steps:
        plain, resumable = [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as directory:
                plain.append(steps_per_second(args.steps, save_steps, True, f"{directory}/plain"))
                resumable.append(steps_per_second(args.steps, save_steps, False, f"{directory}/resumable"))
        for name, measured in (("plain Trainer script", plain), ("with resumable.trainer", resumable)):
            ratios = [mine / theirs for mine, theirs in zip(resumable, measured)]
            each = ", ".join(f"{value:.1f}" for value in measured)
            print(f"| {save_steps} | {name} | {statistics.median(measured):.1f} | {each} | {statistics.median(ratios):.3f}x ({', '.join(f'{r:.3f}' for r in ratios)}) |")


if __name__ == "__main__":
    main()
