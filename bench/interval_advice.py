"""Checkpoint interval advice: what --save_steps 250, 1000 or 5000 costs, from a short real run.

    .venv/bin/python bench/interval_advice.py [--probe_steps 100] [--probe_save_steps 25] [train_loop.py flags]

Runs train_loop.py (your model and data flags, or the built-in default) for --probe_steps steps with a
checkpoint every --probe_save_steps, in a temporary output directory. The save time is read from its
'💾 Saved checkpoint-N (..., X.XXs)' lines (0.01 s resolution; the mean of the saves), the step time is
the median time per step between progress lines that have no save between them. For each
--save_steps it prints the time between saves, the save overhead (save time / time of the steps
between two saves) and the training an interruption loses on average (half an interval).
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from stopwatch import STEP_LINE, run_until

REPO = Path(__file__).resolve().parent.parent
SAVED_LINE = re.compile(r"💾 Saved checkpoint-(\d+) \([^,]*, ([\d.]+)s")


def measure(train_flags: list[str], probe_steps: int, probe_save_steps: int, logging_steps: int) -> tuple[float, list[float]]:
    """(median seconds per step, seconds of each save) of a short real run."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(REPO / "train_loop.py"), *train_flags, "--output_dir", scratch, "--max_steps", str(probe_steps),
                   "--save_steps", str(probe_save_steps), "--logging_steps", str(logging_steps)]  # fmt: skip
        lines = run_until(command, os.environ, lambda line: line.startswith("🏁 Training complete"), timeout=3600, cwd=REPO)
    saves, per_step, previous = [], [], None  # previous: (seconds, step) of the last progress line with no save after it
    for seconds, line in lines:
        if match := SAVED_LINE.search(line):
            saves.append(float(match[2]))
            previous = None  # the next interval contains this save
        elif match := STEP_LINE.match(line):
            step = int(match[1])
            if previous is not None:
                per_step.append((seconds - previous[0]) / (step - previous[1]))
            previous = (seconds, step)
    return statistics.median(per_step), saves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe_steps", type=int, default=100, help="steps of the measuring run")
    parser.add_argument("--probe_save_steps", type=int, default=25, help="a checkpoint every N steps in the measuring run")
    parser.add_argument("--probe_logging_steps", type=int, default=5)
    parser.add_argument("--intervals", type=int, nargs="+", default=[250, 1000, 5000], help="--save_steps values to advise on")
    args, train_flags = parser.parse_known_args(argv)
    step_seconds, saves = measure(train_flags, args.probe_steps, args.probe_save_steps, args.probe_logging_steps)
    save_seconds = statistics.mean(saves)
    flags = " ".join(train_flags) or "(built-in default model and data)"
    print(f"train_loop.py {flags}: {step_seconds:.3f} s per step, {save_seconds:.2f} s per save "
          f"(saves: {', '.join(f'{s:.2f}' for s in saves)} s)\n")  # fmt: skip
    print("| --save_steps | time between saves | save overhead | training lost by an interruption (average) |")
    print("|---|---|---|---|")
    for interval in args.intervals:
        training = interval * step_seconds
        print(f"| {interval} | {minutes(training)} | {100 * save_seconds / training:.2f}% | {minutes(training / 2)} |")
    return 0


def minutes(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    sys.exit(main())
