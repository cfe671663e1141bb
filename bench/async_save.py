"""Benchmark: --async_save against the synchronous save: how long the loop is blocked, and what a run loses.

    .venv/bin/python bench/async_save.py blocked [--models 10M 100M] [--repeats 5] [--dir DIR]
    .venv/bin/python bench/async_save.py steps [--models 10M 100M] [--repeats 2]

blocked: the GPT-2-style models of bench/save_cost.py (AdamW after one step, a real
Accelerator(cpu=True)), in one process. Each round saves once with state.save_checkpoint (the
synchronous save: the loop waits for all of it) and once with resumable.background_save.BackgroundSaver
(`start`: what the loop waits for; then `wait`, whose time the loop would spend training), in
alternating order. Two untimed rounds first (the first snapshots allocate and fault in their
buffers, which are then reused; the first one's blocked time is printed separately). Ratios are
taken within each round.

steps: train_loop.py as users run it, on the same model shapes (--config_name written from the
widths and depths above), batch --batch_size x --block_size. Two runs at the same moment, each
pinned to a core of its own (taskset, OMP_NUM_THREADS=1), cores swapped each round: one with
--async_save true --save_steps 20, one with no save inside the timed steps. The writer thread
shares its run's core: the harshest case (on a GPU machine the CPU is mostly idle meanwhile).
Steps/s are taken over the steps both runs were training, from their progress lines.
"""

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from save_cost import MODELS, build  # noqa: E402


def progress_at(step: int):
    from resumable import state

    return state.TrainingState(global_step=step, total_steps=10**6, steps_per_epoch=10**6, global_batch_size=1, per_device_train_batch_size=1)


def blocked_round(accelerator, model, saver, scratch: Path, order: tuple, step: int) -> dict:
    import shutil

    from resumable import state

    times = {}
    for kind in order:
        directory = scratch / f"{kind}-{step}"
        directory.mkdir()
        began = time.perf_counter()
        if kind == "sync":
            state.save_checkpoint(accelerator, model, directory, progress_at(step), [], [], {"benchmark": "async_save"})
            times["sync"] = time.perf_counter() - began
        else:
            saver.start(model, directory, progress_at(step), [], [], {"benchmark": "async_save"}, "benchmark", time.monotonic())
            times["blocked"] = time.perf_counter() - began
            done = saver.wait()
            times["written"] = done.write_seconds
        shutil.rmtree(directory)
    return times


def measure_blocked(args) -> None:
    from accelerate import Accelerator

    from resumable import background_save

    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    accelerator = Accelerator(cpu=True)
    print(f"medians of {args.repeats} rounds, written to {Path(args.dir or tempfile.gettempdir()).resolve()}\n")
    print("| model | checkpoint MB | synchronous save (s) | async: loop blocked (s) | blocked / sync (paired, median and range) | async: written in (s) | first async save blocked (s) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        scratch = Path(scratch)
        for name in args.models:
            width, layers = MODELS.get(name) or map(int, name.split("x"))
            model, optimizer = build(accelerator, width, layers)
            saver = background_save.BackgroundSaver(accelerator)
            size = background_save.snapshot_bytes(accelerator)
            first = blocked_round(accelerator, model, saver, scratch, ("async", "sync"), 1)  # warm-up rounds, not in the medians
            blocked_round(accelerator, model, saver, scratch, ("async", "sync"), 2)
            rounds = [blocked_round(accelerator, model, saver, scratch, ("sync", "async") if i % 2 else ("async", "sync"), i + 3) for i in range(args.repeats)]
            ratios = [r["blocked"] / r["sync"] for r in rounds]
            median = {key: statistics.median(r[key] for r in rounds) for key in ("sync", "blocked", "written")}
            print(f"| {name} | {size / 1e6:.0f} (state in memory) | {median['sync']:.3f} | {median['blocked']:.3f} | "
                  f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) | {median['written']:.3f} | {first['blocked']:.3f} |", flush=True)  # fmt: skip
            accelerator.free_memory(model, optimizer)
            del saver


def model_config(scratch: Path, name: str) -> Path:
    width, layers = MODELS.get(name) or map(int, name.split("x"))
    base = json.loads((REPO / "configs" / "gpt2-small-byte.json").read_text())
    path = scratch / f"gpt2-{name}.json"
    path.write_text(json.dumps({**base, "n_embd": width, "n_layer": layers, "n_head": max(1, width // 64)}))
    return path


def measure_steps(args) -> None:
    from loop_overhead import side_by_side
    from restart_preprocessing import write_corpus

    first, last = args.warmup_steps, args.warmup_steps + args.measured_steps
    print(f"batch {args.batch_size} x {args.block_size} tokens, steps {first}-{last} timed, saves every {args.save_steps} steps "
          f"(at {', '.join(str(s) for s in range(args.save_steps, last + 1, args.save_steps) if s > first)} inside), {args.repeats} rounds\n")  # fmt: skip
    print("| model | steps/s with async saves | steps/s without saves | ratio (paired, each round) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        for name in args.models:
            config = model_config(scratch, name)
            rates = {"async": [], "none": []}
            for round_ in range(args.repeats):
                shared = [sys.executable, str(REPO / "train_loop.py"), "--config_name", str(config), "--train_file", str(corpus),
                          "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size),
                          "--max_steps", "100000", "--logging_steps", str(args.logging_steps), "--save_total_limit", "2"]  # fmt: skip
                runs = {
                    "async": [*shared, "--output_dir", str(scratch / f"async-{name}-{round_}"), "--save_steps", str(args.save_steps), "--async_save", "true"],
                    "none": [*shared, "--output_dir", str(scratch / f"none-{name}-{round_}"), "--save_steps", "100000"],
                }  # fmt: skip
                order = ["async", "none"] if round_ % 2 == 0 else ["none", "async"]  # swap cores each round
                measured = side_by_side([runs[kind] for kind in order], env, first, last, min_overlap=args.min_overlap_seconds)
                for kind, rate in zip(order, measured):
                    rates[kind].append(rate)
            ratios = [a / b for a, b in zip(rates["async"], rates["none"])]
            print(f"| {name} | {statistics.median(rates['async']):.3f} | {statistics.median(rates['none']):.3f} | "
                  f"{statistics.median(ratios):.3f}x ({', '.join(f'{r:.3f}' for r in ratios)}) |", flush=True)  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["blocked", "steps"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="10M, 100M or WIDTHxLAYERS")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default: 5 for blocked, 2 for steps)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory under $TMPDIR)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--save_steps", type=int, default=20)
    parser.add_argument("--warmup_steps", type=int, default=25, help="steps before the stopwatch starts (a save at 20 comes before)")
    parser.add_argument("--measured_steps", type=int, default=60)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--corpus_lines", type=int, default=20_000)
    parser.add_argument("--min_overlap_seconds", type=float, default=10.0, help="refuse shorter common training times")
    args = parser.parse_args(argv)
    if args.what == "blocked":
        args.repeats = args.repeats or 5
        measure_blocked(args)
    else:
        args.repeats = args.repeats or 2
        measure_steps(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
