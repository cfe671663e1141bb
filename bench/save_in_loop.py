"""Benchmark: what one checkpoint costs inside the loop as launched, next to a direct fsynced write of the same state.

    .venv/bin/python bench/save_in_loop.py [--models 25M 100M] [--rounds 3] [--cycles 8]

In the loop: ./launch.sh with the built-in GPT-2 config resized (25M = n_embd 512 x 8 layers,
100M = 768 x 14, the 100M of bench/save_cost.py), --save_steps 4, --save_total_limit 2 (rotation
from the third save on), --logging_steps 1, batch 1 x 32 tokens so a step is short beside a save
(the checkpoint's size does not depend on the batch). The run is read step by step: the time
between the progress lines of steps s and s+1 holds the save at step s (the gather,
state.save_checkpoint, rotation, the live trainer_state.json) plus one step, and one step (the
median of the steps with no save before them) is taken off. "One save" is the median from the
sixth save on (--cycles of them): the steady state of a run that saves many times. The first five
are shown on their own (the first, and the median of the second to the fifth): while a process's
checkpoints grow to their steady footprint in the page cache (three checkpoints, with rotation),
its writes land in memory that was never touched or was handed back, which on this machine costs
more (see BENCHMARKS.md); a direct write pays that too.

The direct write, in a loop: bench/loop_overhead.py's plain PyTorch loop on the same model, batch
and data, writing at the same steps what a hand-written loop would (safetensors.torch.save_file of
the weights + torch.save of the AdamW state + os.fsync of both, bench/save_cost.py's direct write),
keeping the newest two. It is read the same way (its stall between step lines) and also prints the
write's own seconds. This is the comparison that holds on any machine: both writes meet the same
memory and disk conditions, at the same distance from the previous save.

Also, the issue's method: one run of ./launch.sh without saves; the median 4-step cycle with a save
minus the median without (it carries the noise of four steps). And out of the loop, in the same
round: bench/save_cost.py for the same model with --pause 3 (each write after 3 s of idling, as
in training, where saves are seconds to hours apart; without the pause it writes back to back,
which on a virtual machine measures a faster page cache than training ever meets; see
BENCHMARKS.md). The four alternate in a rotating order; ratios are taken within a round.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from launch_speed import model_config
from loop_overhead import PLAIN, commands
from restart_preprocessing import write_corpus
from stopwatch import run_to_end, step_times

REPO = Path(__file__).resolve().parent.parent
MODELS = {"25M": "512x8", "100M": "768x14"}
SAVE_STEPS = 4
FIRST_TIMED = 6 * SAVE_STEPS  # the sixth save: rotation has deleted three times, the page cache holds its steady share
SAVED_LINE = re.compile(r"💾 Saved checkpoint-(\d+) \([^,]*, ([\d.]+)s")
DIRECT_LINE = re.compile(r"direct write of step (\d+): ([\d.]+)s")
OUT_OF_LOOP_PAUSE = 3.0


def read_saves(lines, last: int, own_seconds: re.Pattern):
    """(each 4-step cycle from FIRST_TIMED on, {step: the save's stall between its step lines}, {step: the save's own seconds})."""
    arrived = step_times(lines)
    own = {int(m[1]): float(m[2]) for _, line in lines if (m := own_seconds.search(line))}
    step = statistics.median(arrived[s + 1] - arrived[s] for s in range(FIRST_TIMED, last) if s % SAVE_STEPS)
    stalls = {s: arrived[s + 1] - arrived[s] - step for s in range(SAVE_STEPS, last, SAVE_STEPS)}
    return [arrived[s + SAVE_STEPS] - arrived[s] for s in range(FIRST_TIMED, last, SAVE_STEPS)], stalls, own


def launched_loop(config: Path, corpus: Path, output_dir: Path, env: dict, last: int, with_saves: bool, batch: int, block: int):
    command = [str(REPO / "launch.sh"), "--config_name", str(config), "--train_file", str(corpus), "--output_dir", str(output_dir),
               "--block_size", str(block), "--per_device_train_batch_size", str(batch), "--max_steps", str(last),
               "--save_steps", str(SAVE_STEPS if with_saves else last), "--save_total_limit", "2", "--logging_steps", "1"]  # fmt: skip
    return read_saves(run_to_end(command, env, cwd=REPO), last, SAVED_LINE)


def plain_loop(config: Path, corpus: Path, scratch: Path, env: dict, last: int, batch: int, block: int, run: str):
    flags = SimpleNamespace(config_name=str(config), block_size=block, batch_size=batch, seed=42, learning_rate=5e-4, max_steps=last, logging_steps=1)
    command = [*commands(flags, corpus, scratch, run)[PLAIN], "--save_steps", str(SAVE_STEPS)]
    return read_saves(run_to_end(command, env, cwd=REPO), last, DIRECT_LINE)


def out_of_loop(shape: str, repeats: int, env: dict, directory: Path) -> dict:
    """bench/save_cost.py's row for this model: parameters, MB, save_checkpoint and direct write (s)."""
    command = [sys.executable, str(REPO / "bench" / "save_cost.py"), "--models", shape, "--repeats", str(repeats),
               "--pause", str(OUT_OF_LOOP_PAUSE), "--dir", str(directory)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {shape} |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    return {"parameters": int(cells[1].replace(",", "")), "megabytes": float(cells[2]), "save": float(cells[3]), "direct": float(cells[4])}


COLUMNS = (
    "model", "parameters", "checkpoint MB",
    "launch.sh: one save, stall between step lines (s)", "its '💾 Saved' (s)",
    "plain loop: one direct write, stall between step lines (s)", "its write alone (s)",
    "launch.sh / plain loop, stalls: median (range)", "'💾 Saved' / write alone",
    "cycle with save - cycle without (s)", "launch.sh: first save, stall (s)", "saves 2-5, stall (s)", "plain loop: saves 2-5, stall (s)",
    f"out of loop, {OUT_OF_LOOP_PAUSE:g} s apart: save_checkpoint (s)", "direct write (s)", "out of loop / direct",
)  # fmt: skip


def print_row(name, shape, rounds) -> None:
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratios = [r["one_save"] / r["plain_stall"] for r in rounds]
    cells = [
        f"{name} ({shape})", f"{rounds[0]['parameters']:,}", f"{rounds[0]['megabytes']:.1f}",
        f"{median['one_save']:.3f}", f"{median['saved']:.3f}",
        f"{median['plain_stall']:.3f}", f"{median['plain_write']:.3f}",
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", f"{median['saved'] / median['plain_write']:.2f}x",
        f"{median['cycle_difference']:.3f}", f"{median['first_save']:.2f}", f"{median['warming_up']:.2f}", f"{median['plain_warming_up']:.2f}",
        f"{median['save']:.3f}", f"{median['direct']:.3f}", f"{median['save'] / median['direct']:.2f}x",
    ]  # fmt: skip
    print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="25M, 100M or WIDTHxLAYERS")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=8, help="timed 4-step cycles per run, from the sixth save on")
    parser.add_argument("--repeats", type=int, default=3, help="bench/save_cost.py's --repeats, per round")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--corpus_lines", type=int, default=5_000)
    args = parser.parse_args(argv)
    last = FIRST_TIMED + args.cycles * SAVE_STEPS

    rows = []
    print(f"batch {args.batch_size} x {args.block_size} tokens, --save_steps {SAVE_STEPS} --save_total_limit 2, {args.cycles} cycles of "
          f"{SAVE_STEPS} steps per run, {args.rounds} rounds, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start\n")  # fmt: skip
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}
        for name in args.models:
            shape = MODELS.get(name, name)
            config = model_config(shape, scratch)
            shapes = dict(batch=args.batch_size, block=args.block_size)
            rounds = []
            for round_number in range(args.rounds):
                measured = {}
                kinds = ["with", "plain", "without", "out"]
                for kind in kinds[round_number % 4 :] + kinds[: round_number % 4]:
                    output_dir = scratch / f"{shape}-{kind}-{round_number}"
                    if kind == "out":
                        measured[kind] = out_of_loop(shape, args.repeats, env, scratch)
                    elif kind == "plain":
                        measured[kind] = plain_loop(config, corpus, scratch, env, last, run=f"{shape}-{round_number}", **shapes)
                    else:
                        measured[kind] = launched_loop(config, corpus, output_dir, env, last, with_saves=kind == "with", **shapes)
                with_cycles, stalls, saved = measured["with"]
                _, plain_stalls, plain_writes = measured["plain"]
                steady = range(FIRST_TIMED, last, SAVE_STEPS)
                rounds.append({
                    "one_save": statistics.median(stalls[s] for s in steady),
                    "saved": statistics.median(saved[s] for s in steady),
                    "plain_stall": statistics.median(plain_stalls[s] for s in steady),
                    "plain_write": statistics.median(plain_writes[s] for s in steady),
                    "cycle_difference": statistics.median(with_cycles) - statistics.median(measured["without"][0]),
                    "first_save": stalls[SAVE_STEPS],
                    "warming_up": statistics.median(stalls[s] for s in range(2 * SAVE_STEPS, FIRST_TIMED, SAVE_STEPS)),
                    "plain_warming_up": statistics.median(plain_stalls[s] for s in range(2 * SAVE_STEPS, FIRST_TIMED, SAVE_STEPS)),
                    **measured["out"],
                })  # fmt: skip
            rows.append((name, shape, rounds))
            print_row(name, shape, rounds)  # as soon as it is measured: the 100M model takes long

    print("\neach round (launch.sh stall / plain loop stall):", json.dumps({name: [round(r["one_save"] / r["plain_stall"], 3) for r in rounds] for name, _, rounds in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
