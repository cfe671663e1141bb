"""Benchmark: ./launch.sh as it ships against a plain PyTorch loop, the way a user runs each.

    .venv/bin/python bench/launch_speed.py [--rounds 5] [--models 128x4 256x4] [--measured_steps 300]

What a user runs: `./launch.sh` with default settings (only the model, the data, --output_dir and
--max_steps are given; batch 8, block 128, logging every 50 steps, no save before the end), and a
plain loop started as `python plain_loop.py` (bench/loop_overhead.py's: the same model, blocks,
batch, AdamW, schedule and clipping, nothing else). Neither is pinned to a core and neither gets a
thread count from us: the environment is the caller's, without OMP_NUM_THREADS, so the plain loop
uses torch's default (one thread per core) and launch.sh chooses its own.

Each model (WIDTHxLAYERS: the built-in config, configs/gpt2-small-byte.json, with n_embd and n_layer
replaced; 256x4 is the built-in model itself) runs --rounds rounds; a round runs launch.sh and the
plain loop one after the other, to their ends, in alternating order. A loop's time per step is
taken between its progress lines of step 50 and of the last step, as they arrive, so start-up and
the final save are not counted. The ratio launch.sh / plain (steps per second) is taken within each
round, so the machine's drift over minutes cancels; the table gives the median and range.

--together runs the two at the same moment instead (neither pinned, each with its own threads), and
takes each one's rate over the time both were training (step counts interpolated between progress
lines, as bench/loop_overhead.py side_by_side does). On a machine shared with other work, whose load changes
from minute to minute, that is the fair comparison: both meet the same load. They also compete
with each other, so the absolute rates are lower than either would reach alone.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from loop_overhead import PLAIN, add_loop_arguments, commands
from loop_overhead import steps_at
from restart_preprocessing import write_corpus
from stopwatch import run_to_end, step_times

REPO = Path(__file__).resolve().parent.parent
BUILT_IN = REPO / "configs" / "gpt2-small-byte.json"


def model_config(shape: str, directory: Path) -> Path:
    """The built-in config with n_embd x n_layer = SHAPE (e.g. 128x4)."""
    width, layers = map(int, shape.split("x"))
    path = directory / f"gpt2-{shape}.json"
    path.write_text(json.dumps({**json.loads(BUILT_IN.read_text()), "n_embd": width, "n_layer": layers}))
    return path


def seconds_per_step(lines, first: int, last: int) -> float:
    arrived = step_times(lines)
    return (arrived[last] - arrived[first]) / (last - first)


def seconds_per_step_together(commands_by_name: dict, env: dict, first: int) -> dict:
    """Run the commands at once; each one's seconds per step over the time all were past step `first`."""
    launched, arrivals = time.perf_counter(), {}

    def run(name, command):
        started = time.perf_counter() - launched
        arrivals[name] = sorted((started + seconds, step) for step, seconds in step_times(run_to_end(command, env, cwd=REPO)).items())

    threads = [threading.Thread(target=run, args=item) for item in commands_by_name.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(arrivals) != len(commands_by_name):
        raise RuntimeError("a loop failed; see its output above")
    begin = max(next(t for t, step in steps if step >= first) for steps in arrivals.values())
    end = min(steps[-1][0] for steps in arrivals.values())
    if end <= begin:
        raise RuntimeError("the loops never trained at the same time; raise --measured_steps")
    return {name: (end - begin) / (steps_at(steps, end) - steps_at(steps, begin)) for name, steps in arrivals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["128x4", "256x4"], help="WIDTHxLAYERS of the built-in GPT-2 config")
    parser.add_argument("--together", action="store_true", help="run the two at the same moment, not one after the other")
    add_loop_arguments(parser, logging_steps=50)  # 50: launch.sh's default; the plain loop prints as often
    parser.set_defaults(warmup_steps=50, measured_steps=300)
    args = parser.parse_args(argv)
    first, last = args.warmup_steps, args.warmup_steps + args.measured_steps
    assert first % args.logging_steps == 0 and last % args.logging_steps == 0, "steps must be multiples of --logging_steps"
    args.max_steps = last  # both loops end at the last timed step

    # The caller's environment, as a user's shell would pass it, minus any thread count.
    env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env.update(HF_HOME=str(scratch / "hf_home"), HF_HUB_OFFLINE="1")  # one tokenization cache for every run
        for shape in args.models:
            args.config_name = str(model_config(shape, scratch))
            times = {"launch": [], "plain": []}
            for round_number in range(args.rounds):
                output_dir = scratch / f"launch-{shape}-{round_number}"
                launch = [str(REPO / "launch.sh"), "--config_name", args.config_name, "--train_file", str(corpus),
                          "--output_dir", str(output_dir), "--max_steps", str(last)]  # fmt: skip
                if args.block_size != 128 or args.batch_size != 8:  # the defaults; smoke tests shrink them
                    launch += ["--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size)]
                if args.logging_steps != 50:
                    launch += ["--logging_steps", str(args.logging_steps)]
                plain = commands(args, corpus, scratch, f"{shape}-{round_number}")[PLAIN]
                order = [("launch", launch), ("plain", plain)]
                if args.together:
                    for name, seconds in seconds_per_step_together(dict(order), env, first).items():
                        times[name].append(seconds)
                    continue
                for name, command in order if round_number % 2 == 0 else order[::-1]:
                    times[name].append(seconds_per_step(run_to_end(command, env, cwd=REPO), first, last))
            ratios = [plain / launch for launch, plain in zip(times["launch"], times["plain"])]  # steps/s launch over plain
            rows.append((shape, times, ratios))

    load = os.getloadavg()[0]
    print(f"batch {args.batch_size} x {args.block_size} tokens, steps {first}-{last} timed, {args.rounds} rounds, "
          f"launch.sh and the plain loop {'at the same time' if args.together else 'alternating'}, {os.cpu_count()} cores, load average {load:.2f} at the end\n")  # fmt: skip
    print("| model (n_embd x layers) | launch.sh / plain loop: median (range) | each round | launch.sh s/step (median) | plain loop s/step (median) |")
    print("|---|---|---|---|---|")
    for shape, times, ratios in rows:
        each = ", ".join(f"{ratio:.3f}" for ratio in ratios)
        print(f"| {shape} | {statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) | {each} | "
              f"{statistics.median(times['launch']):.4f} | {statistics.median(times['plain']):.4f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
