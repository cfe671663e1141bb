"""Benchmark: train_loop.py against each other loop at the same moment, one core each.

    .venv/bin/python bench/loop_side_by_side.py [--repeats 4] [--config_name configs/gpt2-small-byte.json]

On this shared machine the speed of one and the same loop drifts by ±20 % within minutes
(BENCHMARKS.md), so loops run one after the other cannot resolve a few percent. Here train_loop.py
and one other loop (the plain loop, the plain loop with train_loop.py's malloc settings, or
transformers.Trainer; the same commands as bench/loop_overhead.py) run simultaneously, each pinned
to a core of its own (taskset) with OMP_NUM_THREADS=1, so both meet the same conditions. The cores
are swapped every round. Each loop's rate is taken over the time both were training: from the
later of their step-20 lines to the earlier of their last lines, with step counts interpolated
between progress lines. The table shows the median and range of train_loop.py's speed relative
to each other loop.
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from loop_overhead import PLAIN, PLAIN_MALLOC, TRAIN_LOOP, TRAINER, add_loop_arguments, commands
from restart_preprocessing import write_corpus
from timeline import run_until, step_times, until_step

REPO = Path(__file__).resolve().parent.parent
OTHERS = (PLAIN, PLAIN_MALLOC, TRAINER)


def steps_at(arrivals: list[tuple[float, int]], moment: float) -> float:
    """The step count at `moment`, interpolated between the (time, step) progress lines around it."""
    for (t0, s0), (t1, s1) in zip(arrivals, arrivals[1:]):
        if t0 <= moment <= t1:
            return s0 + (s1 - s0) * (moment - t0) / (t1 - t0)
    raise ValueError("moment outside the run")


def side_by_side(commands_by_core: list[list[str]], env: dict, first: int, last: int, min_overlap: float) -> list[float]:
    """Run the commands at once, the i-th pinned to core i; each one's steps/s while all were training."""
    launched = time.perf_counter()
    results = [None] * len(commands_by_core)

    def run(index: int, command: list[str]) -> None:
        started = time.perf_counter() - launched
        lines = run_until(["taskset", "-c", str(index), *command], env, until_step(last), cwd=REPO)
        results[index] = sorted((started + seconds, step) for step, seconds in step_times(lines).items())

    threads = [threading.Thread(target=run, args=(index, command)) for index, command in enumerate(commands_by_core)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(result is None for result in results):
        raise RuntimeError("a loop failed; see its output above")
    begin = max(next(t for t, step in arrivals if step >= first) for arrivals in results)
    end = min(arrivals[-1][0] for arrivals in results)
    if end - begin < min_overlap:
        raise RuntimeError(f"the loops trained together for only {end - begin:.1f} s; raise --measured_steps")
    return [(steps_at(arrivals, end) - steps_at(arrivals, begin)) / (end - begin) for arrivals in results]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="rounds; each runs train_loop.py beside every other loop")
    add_loop_arguments(parser, logging_steps=5)
    parser.add_argument("--min_overlap_seconds", type=float, default=10.0, help="refuse shorter common training times")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores")

    first, last = args.warmup_steps, args.warmup_steps + args.measured_steps
    ratios = {name: [] for name in OTHERS}
    rates = {name: [] for name in (TRAIN_LOOP, *OTHERS)}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        run = 0
        for round_number in range(args.repeats):
            for other in OTHERS:
                run += 1
                command = commands(args, corpus, scratch, run)
                pair = [command[TRAIN_LOOP], command[other]]
                swapped = round_number % 2 == 1  # train_loop.py on core 0 in even rounds, core 1 in odd ones
                ours, theirs = side_by_side(pair[::-1] if swapped else pair, env, first, last, args.min_overlap_seconds)[:: -1 if swapped else 1]
                ratios[other].append(ours / theirs)
                rates[TRAIN_LOOP].append(ours)
                rates[other].append(theirs)

    print(f"{Path(args.config_name).name}, batch {args.batch_size} x {args.block_size} tokens, OMP_NUM_THREADS=1, "
          f"one core per loop, {args.repeats} rounds, rates over the time both loops trained (after step {first})\n")  # fmt: skip
    print("| train_loop.py beside | train_loop.py / it: median (range) | each round | its steps/s (median) | train_loop.py's steps/s (median) |")
    print("|---|---|---|---|---|")
    for other in OTHERS:
        ours = [rate for index, rate in enumerate(rates[TRAIN_LOOP]) if index % len(OTHERS) == OTHERS.index(other)]
        each = ", ".join(f"{ratio:.3f}" for ratio in ratios[other])
        print(f"| {other} | {statistics.median(ratios[other]):.3f}x ({min(ratios[other]):.3f}-{max(ratios[other]):.3f}) | "
              f"{each} | {statistics.median(rates[other]):.2f} | {statistics.median(ours):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
