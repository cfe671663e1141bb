"""Benchmark: how far an elastic resume (2 -> 1 and 1 -> 2 processes) ends from the uninterrupted run.

    .venv/bin/python bench/elastic_resume.py [--config_name tests/tiny-gpt2.json] [--max_steps 70] [--resume_from_step 20]

Through ./launch.sh as it ships (NUM_PROCESSES=2 is two CPU ranks over gloo). Global batch
2 x --per_device_train_batch_size either way: 2 processes with accumulation 1, or 1 process with
accumulation 2. For each direction: an uninterrupted run on the first layout, which keeps every
checkpoint; its checkpoint-<--resume_from_step>, copied alone into an empty output directory, is
resumed there on the other layout to the end. That is what a run killed after that checkpoint
leaves to resume from (a killed run's newest checkpoint has the same bytes: tests/test_multiprocess.py
kills them), without training the killed run's steps a second time. Prints max |w_resumed -
w_uninterrupted| / max |w| over the final model.safetensors (the largest difference of any weight,
relative to the largest weight).
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from restart_preprocessing import write_corpus

REPO = Path(__file__).resolve().parent.parent


def launch(env, num_processes: int, flags: list[str]) -> str:
    """./launch.sh to its end (the final model written); its output."""
    process = subprocess.Popen([str(REPO / "launch.sh"), *flags], env={**env, "NUM_PROCESSES": str(num_processes)}, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    lines, complete = [], False
    for line in process.stdout:
        lines.append(line)
        if line.startswith("🏁 Training complete"):  # the final model is written
            complete = True
            break
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # seen once: a rank hung in the gloo group's destructor at exit, after the final model was written
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if not complete:
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
    parser.add_argument("--resume_from_step", type=int, default=20, help="the checkpoint resumed on the other layout (a multiple of --save_steps)")
    parser.add_argument("--corpus_lines", type=int, default=3000)
    parser.add_argument("--extra", default="", help="more training flags, e.g. '--full_determinism'")
    args = parser.parse_args(argv)
    if args.resume_from_step % args.save_steps or not 0 < args.resume_from_step < args.max_steps:
        parser.error(f"--resume_from_step {args.resume_from_step}: a multiple of --save_steps ({args.save_steps}) below --max_steps ({args.max_steps})")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        every_checkpoint = str(args.max_steps // args.save_steps + 1)  # rotation must keep the one resumed from
        shared = ["--config_name", args.config_name, "--train_file", str(corpus), "--block_size", str(args.block_size),
                  "--per_device_train_batch_size", str(args.per_device_train_batch_size), "--max_steps", str(args.max_steps),
                  "--save_steps", str(args.save_steps), "--save_total_limit", every_checkpoint, "--logging_steps", "1", *args.extra.split()]  # fmt: skip
        checkpoint = f"checkpoint-{args.resume_from_step}"
        print(f"{Path(args.config_name).name}: {args.max_steps} steps, global batch {2 * args.per_device_train_batch_size}, "
              f"resumed from {checkpoint}\n")  # fmt: skip
        print("| resume | max abs difference / max abs weight |")
        print("|---|---|")
        for before, after in ((2, 1), (1, 2)):
            flags = [*shared, "--gradient_accumulation_steps", str(2 // before)]
            reference, resumed = scratch / f"reference-{before}", scratch / f"resumed-{before}to{after}"
            launch(env, before, [*flags, "--output_dir", str(reference)])
            shutil.copytree(reference / checkpoint, resumed / checkpoint)
            output = launch(env, after, [*flags, "--output_dir", str(resumed)])
            assert f"world size {before} → {after}" in output, output[-3000:]  # it did resume on the other layout
            assert f"✅ Resumed from checkpoint (step {args.resume_from_step}," in output, output[-3000:]
            print(f"| {before} → {after} | {relative_difference(resumed, reference):.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
