"""Benchmark: time from launch to the first training step after a resume, early and late in an epoch.

    .venv/bin/python bench/resume_cost.py [--samples 2000000] [--batch_size 256] [--repeats 3]

A map-style data set of --samples blocks of --block_size tokens (a generated corpus, cut with
--max_train_samples) and a tiny model. train_loop.py first trains to 1 % and to 95 % of the first
epoch, saving a checkpoint there (--max_steps = --save_steps = that step). Then the same command with
a larger --max_steps and --logging_steps 1 resumes from it, alternately, --repeats times; the stopwatch
runs from the launch to the line of the first step after the resume (also: to '✅ Resumed', before the
data position is restored). The process is killed at that line. Prints medians.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from restart_preprocessing import write_corpus
from stopwatch import run_until, step_times, until_step

REPO = Path(__file__).resolve().parent.parent
FRACTIONS = (0.01, 0.95)


def train_loop_command(args, corpus: Path, output_dir: Path, max_steps: int, save_steps: int, logging_steps: int) -> list[str]:
    return [
        sys.executable, str(REPO / "train_loop.py"), "--output_dir", str(output_dir), "--train_file", str(corpus),
        "--config_name", args.config_name, "--block_size", str(args.block_size), "--max_train_samples", str(args.samples),
        "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(max_steps),
        "--save_steps", str(save_steps), "--logging_steps", str(logging_steps), "--save_total_limit", "1",
    ]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2_000_000, help="blocks in the training data")
    parser.add_argument("--block_size", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=256, help="--per_device_train_batch_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config_name", default=str(REPO / "tests" / "tiny-gpt2.json"))
    args = parser.parse_args(argv)
    steps_per_epoch = args.samples // args.batch_size
    resume_steps = {fraction: max(1, round(fraction * steps_per_epoch)) for fraction in FRACTIONS}

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        # ~80 byte tokens a line (ByT5: one token per byte, plus </s>); 10 % spare, the rest is cut off.
        write_corpus(corpus, int(args.samples * args.block_size / 80 * 1.1) + 10)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}
        for fraction, step in resume_steps.items():  # the checkpoints to resume from
            command = train_loop_command(args, corpus, scratch / f"at-{fraction}", step, step, steps_per_epoch)
            run_until(command, env, lambda line: line.startswith("🏁 Training complete"), timeout=3600, cwd=REPO)
            saved = (scratch / f"at-{fraction}" / f"checkpoint-{step}" / "trainer_state.json").read_text()
            assert f'"steps_per_epoch": {steps_per_epoch},' in saved, "the corpus gave fewer blocks than --samples"

        to_resumed, to_first_step = {f: [] for f in FRACTIONS}, {f: [] for f in FRACTIONS}
        for run in range(args.repeats):
            for fraction in FRACTIONS if run % 2 == 0 else FRACTIONS[::-1]:
                step = resume_steps[fraction]
                command = train_loop_command(args, corpus, scratch / f"at-{fraction}", step + 1000, 10**9, 1)
                lines = run_until(command, env, until_step(step + 1), cwd=REPO)
                to_resumed[fraction].append(next(seconds for seconds, line in lines if line.startswith("✅ Resumed")))
                to_first_step[fraction].append(step_times(lines)[step + 1])

    print(f"{args.samples:,} samples of {args.block_size} tokens, batch {args.batch_size}, {steps_per_epoch:,} steps per epoch; "
          f"medians of {args.repeats} runs\n")  # fmt: skip
    print("| resume at | checkpoint step | launch → '✅ Resumed' (s) | launch → first step (s) | each run (s) |")
    print("|---|---|---|---|---|")
    for fraction in FRACTIONS:
        each = ", ".join(f"{seconds:.2f}" for seconds in to_first_step[fraction])
        print(f"| {fraction:.0%} of epoch 1 | {resume_steps[fraction]:,} | {statistics.median(to_resumed[fraction]):.2f} | "
              f"{statistics.median(to_first_step[fraction]):.2f} | {each} |")  # fmt: skip
    late, early = (statistics.median(to_first_step[fraction]) for fraction in reversed(FRACTIONS))
    print(f"| 95% / 1% | | | {late / early:.3f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
