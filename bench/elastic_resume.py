"""Benchmark: how far an elastic resume (2 -> 1 and 1 -> 2 processes) ends from the uninterrupted run.

    .venv/bin/python bench/elastic_resume.py [--config_name tests/tiny-gpt2.json] [--max_steps 70] [--kill_at 25]

Through ./launch.sh as it ships (NUM_PROCESSES=2 is two CPU ranks over gloo). Global batch
2 x --per_device_train_batch_size either way: 2 processes with accumulation 1, or 1 process with
accumulation 2. For each direction: an uninterrupted run on the first layout; the same command
killed with SIGKILL (the whole process group) at the progress line of step --kill_at and resumed
on the other layout from the newest checkpoint. Prints max |w_resumed - w_uninterrupted| / max |w|
over the final model.safetensors (the largest difference of any weight, relative to the largest weight).
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from restart_preprocessing import write_corpus
from stopwatch import STEP_LINE

REPO = Path(__file__).resolve().parent.parent


def launch(env, num_processes: int, flags: list[str], kill_at: int | None = None) -> str:
    """./launch.sh to its end, or until the progress line of step `kill_at`, then kill -9 the whole group; its output."""
    process = subprocess.Popen([str(REPO / "launch.sh"), *flags], env={**env, "NUM_PROCESSES": str(num_processes)}, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    lines, complete = [], False
    for line in process.stdout:
        lines.append(line)
        if kill_at is not None and (match := STEP_LINE.match(line)) and int(match[1]) >= kill_at:
            os.killpg(process.pid, signal.SIGKILL)
            break
        if line.startswith("🏁 Training complete"):  # the final model is written
            complete = True
            break
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # seen once: a rank hung in the gloo group's destructor at exit, after the final model was written
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if kill_at is None and not complete:
        raise RuntimeError(f"launch.sh exited {process.returncode}:\n{''.join(lines[-40:])}")
    return "".join(lines)


def relative_difference(first: Path, second: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    largest_difference = max((a[name] - b[name]).abs().max().item() for name in a)
    return largest_difference / max(b[name].abs().max().item() for name in b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_name", default=str(REPO / "tests" / "tiny-gpt2.json"))
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=70)
    parser.add_argument("--save_steps", type=int, default=10)
    parser.add_argument("--kill_at", type=int, default=25)
    parser.add_argument("--corpus_lines", type=int, default=3000)
    parser.add_argument("--extra", default="", help="more training flags, e.g. '--full_determinism'")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        shared = ["--config_name", args.config_name, "--train_file", str(corpus), "--block_size", str(args.block_size),
                  "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--max_steps", str(args.max_steps),
                  "--save_steps", str(args.save_steps), "--logging_steps", "1", *args.extra.split()]  # fmt: skip
        print(f"{Path(args.config_name).name}: {args.max_steps} steps, global batch {2 * args.per_device_train_batch_size}, "
              f"killed at step {args.kill_at}, resumed from checkpoint-{args.kill_at // args.save_steps * args.save_steps}\n")  # fmt: skip
        print("| resume | max abs difference / max abs weight |")
        print("|---|---|")
        for before, after in ((2, 1), (1, 2)):
            flags = [*shared, "--gradient_accumulation_steps", str(2 // before)]
            reference, resumed = scratch / f"reference-{before}", scratch / f"resumed-{before}to{after}"
            launch(env, before, [*flags, "--output_dir", str(reference)])
            launch(env, before, [*flags, "--output_dir", str(resumed)], kill_at=args.kill_at)
            output = launch(env, after, [*flags, "--output_dir", str(resumed)])
            assert f"world size {before} → {after}" in output, output[-3000:]  # it did resume on the other layout
            print(f"| {before} → {after} | {relative_difference(resumed, reference):.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
