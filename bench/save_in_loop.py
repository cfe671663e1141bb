"""Benchmark: what one checkpoint costs inside the loop as launched, next to a direct fsynced write of the same state.

    .venv/bin/python bench/save_in_loop.py [--models 25M 100M] [--rounds 3] [--cycles 6]

In the loop: ./launch.sh with the built-in GPT-2 config resized (25M = n_embd 512 x 8 layers,
100M = 768 x 14, the 100M of bench/save_cost.py), --save_steps 4, --save_total_limit 2 (rotation
from the third save on), --logging_steps 1, batch 1 x 32 tokens so a step is short beside a save
(the checkpoint's size does not depend on the batch). Each round runs it twice: with those saves,
and with --save_steps beyond the run (no save until the end, which is not timed). A cycle is the
time between the progress lines of steps s and s+4; in the run with saves it holds the save at
step s and all it brings along (the gather, state.save_checkpoint, rotation, the live
trainer_state.json, and whatever the next four steps pay for it). One save costs the median cycle
with a save minus the median cycle without. That difference is what the issue measured, but on a
busy machine it inherits the noise of four steps; so the run with saves is also read step by step:
the time between the progress lines of steps s and s+1 holds the save at step s plus one step,
and one step (the median of the steps with no save before them) is taken off. The first two saves (a process's first, and the last
one before rotation starts) are not in it; the first is shown on its own.

Out of the loop, in the same round: bench/save_cost.py for the same model (state.save_checkpoint
and the direct write: safetensors.torch.save_file + torch.save + os.fsync, medians after an
untimed first round). The three alternate in a rotating order; ratios are taken within a round.
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

from launch_speed import model_config
from restart_preprocessing import write_corpus
from timeline import run_to_end, step_times

REPO = Path(__file__).resolve().parent.parent
MODELS = {"25M": "512x8", "100M": "768x14"}
SAVE_STEPS = 4
SAVED_LINE = re.compile(r"💾 Saved checkpoint-(\d+) \([^,]*, ([\d.]+)s")


def loop_cycles(config: Path, corpus: Path, output_dir: Path, env: dict, cycles: int, with_saves: bool, batch: int, block: int):
    """(seconds of each 4-step cycle from step 12 on, each save's stall between its step lines, {step: '💾 Saved' seconds})."""
    first = 3 * SAVE_STEPS  # the third save: rotation deletes from here on
    last = first + cycles * SAVE_STEPS
    command = [str(REPO / "launch.sh"), "--config_name", str(config), "--train_file", str(corpus), "--output_dir", str(output_dir),
               "--block_size", str(block), "--per_device_train_batch_size", str(batch), "--max_steps", str(last),
               "--save_steps", str(SAVE_STEPS if with_saves else last), "--save_total_limit", "2", "--logging_steps", "1"]  # fmt: skip
    lines = run_to_end(command, env, cwd=REPO)
    arrived = step_times(lines)
    saved = {int(m[1]): float(m[2]) for _, line in lines if (m := SAVED_LINE.search(line))}
    step = statistics.median(arrived[s + 1] - arrived[s] for s in range(first, last) if s % SAVE_STEPS)
    stalls = [arrived[s + 1] - arrived[s] - step for s in range(first, last, SAVE_STEPS)]
    return [arrived[s + SAVE_STEPS] - arrived[s] for s in range(first, last, SAVE_STEPS)], stalls, saved


def out_of_loop(shape: str, repeats: int, env: dict, directory: Path) -> dict:
    """bench/save_cost.py's row for this model: parameters, MB, save_checkpoint and direct write (s)."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "save_cost.py"), "--models", shape, "--repeats", str(repeats), "--dir", str(directory)],
                            env=env, capture_output=True, text=True, check=True)  # fmt: skip
    row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {shape} |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    return {"parameters": int(cells[1].replace(",", "")), "megabytes": float(cells[2]), "save": float(cells[3]), "direct": float(cells[4])}


def print_row(name, shape, rounds) -> None:
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    ratios = [r["one_save"] / r["direct"] for r in rounds]
    out_ratios = [r["save"] / r["direct"] for r in rounds]
    print(f"| {name} ({shape}) | {rounds[0]['parameters']:,} | {rounds[0]['megabytes']:.1f} | {median['one_save']:.3f} | "
          f"{median['in_loop_checkpoint']:.2f} | {median['cycle_difference']:.3f} | {median['first_save']:.2f} | {median['save']:.3f} | {median['direct']:.3f} | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {median['cycle_difference'] / median['direct']:.2f}x | "
          f"{statistics.median(out_ratios):.2f}x |", flush=True)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="25M, 100M or WIDTHxLAYERS")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=6, help="timed 4-step cycles per run")
    parser.add_argument("--repeats", type=int, default=3, help="bench/save_cost.py's --repeats, per round")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--corpus_lines", type=int, default=5_000)
    args = parser.parse_args(argv)

    rows = []
    print(f"batch {args.batch_size} x {args.block_size} tokens, --save_steps {SAVE_STEPS} --save_total_limit 2, {args.cycles} cycles of "
          f"{SAVE_STEPS} steps per run, {args.rounds} rounds, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start\n")  # fmt: skip
    print("| model | parameters | checkpoint MB | in loop: one save, stall between step lines (s) | its save_checkpoint ('💾 Saved', s) "
          "| cycle with save - cycle without (s) | first save of the run (s) | out of loop: save_checkpoint (s) | direct write (s) "
          "| in loop (stall) / direct: median (range) | cycle difference / direct | out of loop / direct |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}
        for name in args.models:
            shape = MODELS.get(name, name)
            config = model_config(shape, scratch)
            rounds = []
            for round_number in range(args.rounds):
                measured = {}
                kinds = ["with", "without", "out"]
                for kind in kinds[round_number % 3 :] + kinds[: round_number % 3]:
                    if kind == "out":
                        measured["out"] = out_of_loop(shape, args.repeats, env, scratch)
                    else:
                        output_dir = scratch / f"{shape}-{kind}-{round_number}"
                        flags = dict(cycles=args.cycles, with_saves=kind == "with", batch=args.batch_size, block=args.block_size)
                        measured[kind] = loop_cycles(config, corpus, output_dir, env, **flags)
                with_cycles, stalls, saved = measured["with"]
                cycle_difference = statistics.median(with_cycles) - statistics.median(measured["without"][0])
                one_save = statistics.median(stalls)
                in_loop_checkpoint = statistics.median(seconds for step, seconds in saved.items() if 3 * SAVE_STEPS <= step < 3 * SAVE_STEPS + args.cycles * SAVE_STEPS)  # fmt: skip
                rounds.append({"one_save": one_save, "cycle_difference": cycle_difference, "in_loop_checkpoint": in_loop_checkpoint, "first_save": saved[SAVE_STEPS], **measured["out"]})
            rows.append((name, shape, rounds))
            print_row(name, shape, rounds)  # as soon as it is measured: the 100M model takes long

    print("\neach round (in loop / direct):", json.dumps({name: [round(r["one_save"] / r["direct"], 3) for r in rounds] for name, _, rounds in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
