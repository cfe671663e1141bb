"""Benchmark: what seeding every micro-batch's random draws (randomness.py) costs the training loop.

    .venv/bin/python bench/seeding_cost.py [--steps 200] [--accumulation 2] [--config_name configs/gpt2-small-byte.json]

One process, train_loop.train_micro_batch on the built-in model (dropout 0.1) with the real accelerator,
AdamW, schedule and data. The steps alternate: with the seeding as resumable.Run does it for the
loop (seed_micro_batch before each micro-batch, from micro_batch_seeds), and without it, so drift of
the machine hits both alike; after --warmup
steps, each step is timed. Also times the seeding calls alone (their own cost, µs per step),
which is the precise number: the per-step difference is within the noise of a step.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

from loop_overhead import fresh_model, training_blocks
from restart_preprocessing import write_corpus

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def time_steps(args) -> dict:
    """{"with": [seconds per step], "without": [...], "calls alone": seconds per step}."""
    import torch
    from accelerate import Accelerator
    from transformers import get_scheduler

    from resumable import randomness
    import train_loop
    from cli.data import Collator

    train, tokenizer = training_blocks(args)
    train_loop.keep_freed_memory_for_reuse()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.accumulation)
    model = fresh_model(args)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=Collator("causal-lm", tokenizer.pad_token_id))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10 * (args.steps + args.warmup))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    def batches():
        while True:
            yield from loader

    stream = batches()
    timings = {"with": [], "without": []}
    for step in range(1, args.warmup + args.steps + 1):
        arm = "with" if step % 2 else "without"
        micro_batches = [next(stream) for _ in range(args.accumulation)]
        began = time.perf_counter()
        seeds = randomness.micro_batch_seeds(args.seed, step, accelerator.process_index, accelerator.num_processes, args.accumulation)
        for batch, seed in zip(micro_batches, seeds):
            if arm == "with":
                randomness.seed_micro_batch(seed, accelerator.device)
            train_loop.train_micro_batch(accelerator, model, optimizer, scheduler, batch, 1.0)
        if step > args.warmup:
            timings[arm].append(time.perf_counter() - began)

    def seed_one_step():  # what the loop adds to a step: the seeds, and seeding before each micro-batch
        for seed in randomness.micro_batch_seeds(args.seed, 1000, 0, 1, args.accumulation):
            randomness.seed_micro_batch(seed, accelerator.device)

    calls = 20_000
    timings["calls alone"] = min(timeit.repeat(seed_one_step, number=calls, repeat=5)) / calls
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_name", default=str(REPO / "configs" / "gpt2-small-byte.json"))
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8, help="per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="timed steps, half of them with the seeding")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--corpus_lines", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        args.train_file, args.scratch = str(Path(scratch) / "corpus.txt"), scratch
        write_corpus(Path(args.train_file), args.corpus_lines)
        os.environ.update(HF_HOME=str(Path(scratch) / "hf_home"), HF_HUB_OFFLINE="1")  # a cache of its own, removed afterwards
        timings = time_steps(args)

    import torch

    with_seeding, without, alone = statistics.median(timings["with"]), statistics.median(timings["without"]), timings["calls alone"]
    print(f"{Path(args.config_name).name}, {args.accumulation} micro-batches of {args.batch_size} x {args.block_size} tokens a step, "
          f"{args.steps} timed steps alternating, {torch.get_num_threads()} thread(s)\n")  # fmt: skip
    print("| | seconds per step (median) | vs without |")
    print("|---|---|---|")
    print(f"| with the seeding | {with_seeding:.4f} | {with_seeding / without:.4f}x |")
    print(f"| without | {without:.4f} | 1.0000x |")
    print(f"| the seeding calls alone | {alone:.7f} | {100 * alone / without:.4f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
