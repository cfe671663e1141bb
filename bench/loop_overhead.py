"""Benchmark: optimizer steps per second of train_loop.py against a plain PyTorch loop and transformers.Trainer.

    .venv/bin/python bench/loop_overhead.py [--repeats 5] [--config_name configs/gpt2-small-byte.json]
    .venv/bin/python bench/loop_overhead.py side_by_side [--repeats 4] [--config_name ...]   (see SIDE_BY_SIDE below)

The loops train the same model config (random init, same seed) on the same data blocks, with the
same batch size, AdamW, linear schedule and gradient clipping, and no checkpoints. Each runs as its
own process and prints 'step N/T' every --logging_steps steps; the rate is taken between two such
lines as they arrive (after --warmup_steps), so start-up, data preparation and train_loop.py's final
save are not counted. train_loop.py is the real program (--save_steps beyond the measured steps).
The plain loop runs twice: as is, and after the same malloc settings train_loop.py makes at start
(train_loop.keep_freed_memory_for_reuse), which separates the loop's own cost from the allocator's.
The four alternate, in a rotating order, --repeats times; ratios are taken within each round.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from restart_preprocessing import write_corpus
from stopwatch import run_until, step_times, until_step

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PLAIN, PLAIN_MALLOC, TRAIN_LOOP, TRAINER = "plain PyTorch loop", "plain loop, train_loop's malloc limits", "train_loop.py", "transformers.Trainer"
CONTENDERS = (PLAIN, PLAIN_MALLOC, TRAIN_LOOP, TRAINER)


def training_blocks(args):
    """The data blocks train_loop.py trains on (data.prepare_datasets, cached), and the tokenizer."""
    from accelerate import PartialState

    from cli.config import parse_config
    from cli.data import prepare_datasets
    from cli.model import build_tokenizer

    flags = ["--config_name", args.config_name, "--train_file", args.train_file, "--block_size", str(args.block_size), "--output_dir", args.scratch]  # fmt: skip
    config = parse_config(flags)
    tokenizer = build_tokenizer(config)
    train, _, _ = prepare_datasets(config, tokenizer, PartialState())
    return train, tokenizer


def fresh_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    set_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_name))
    model.loss_type = "ForCausalLM"  # as train_loop.py does
    return model.train()


def plain_loop(args) -> None:
    if args.worker == "plain-malloc":
        import train_loop

        train_loop.keep_freed_memory_for_reuse()  # what train_loop.py does first: isolates the loop's own cost
    import torch
    from transformers import get_scheduler

    from cli.data import Collator

    train, tokenizer = training_blocks(args)
    model = fresh_model(args)
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, drop_last=True,
        collate_fn=Collator("causal-lm", tokenizer.pad_token_id), generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=args.max_steps)
    step = 0
    while step < args.max_steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.logging_steps == 0:
                print(f"step {step}/{args.max_steps} loss {loss.item():.4f}", flush=True)
            if args.save_steps and step % args.save_steps == 0:
                save_directly(model, optimizer, Path(args.scratch), step, keep=2)
            if step == args.max_steps:
                break


def save_directly(model, optimizer, scratch: Path, step: int, keep: int) -> None:
    """What a hand-written loop would do to checkpoint: the weights and AdamW state written and fsynced
    (bench/save_cost.py's direct write), into save-<step>; then every save but the newest `keep` is
    deleted, after the stopwatch. Prints the write's own seconds."""
    from save_cost import time_direct_write

    directory = scratch / f"save-{step}"
    directory.mkdir(parents=True)
    print(f"direct write of step {step}: {time_direct_write(model, optimizer, directory):.3f}s", flush=True)
    for old in sorted(scratch.glob("save-*"), key=lambda path: int(path.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)


def trainer_loop(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cli.data import Collator

    class PrintSteps(TrainerCallback):
        def on_step_end(self, training_args, trainer_state, control, **kwargs):
            if trainer_state.global_step % args.logging_steps == 0:
                print(f"step {trainer_state.global_step}/{args.max_steps}", flush=True)

    train, tokenizer = training_blocks(args)
    training_args = TrainingArguments(
        output_dir=args.scratch, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
        seed=args.seed, optim="adamw_torch",  # the same torch.optim.AdamW as the others (Trainer's default is the fused one)
        save_strategy="no", eval_strategy="no", logging_steps=args.max_steps, report_to="none",
        dataloader_drop_last=True, dataloader_pin_memory=False, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    collator = Collator("causal-lm", tokenizer.pad_token_id)
    trainer = Trainer(model=fresh_model(args), args=training_args, train_dataset=train, data_collator=collator, callbacks=[PrintSteps()])
    trainer.train()


def commands(args, corpus: Path, scratch: Path, run: int) -> dict:
    """The command line of each contender for one run."""
    shared = ["--config_name", args.config_name, "--block_size", str(args.block_size), "--seed", str(args.seed),
              "--learning_rate", str(args.learning_rate), "--max_steps", str(args.max_steps), "--logging_steps", str(args.logging_steps)]  # fmt: skip
    worker = [sys.executable, __file__, "--train_file", str(corpus), "--batch_size", str(args.batch_size), *shared]
    return {
        PLAIN: [*worker, "--worker", "plain", "--scratch", str(scratch / f"plain-{run}")],
        PLAIN_MALLOC: [*worker, "--worker", "plain-malloc", "--scratch", str(scratch / f"plain-malloc-{run}")],
        TRAIN_LOOP: [
            sys.executable, str(REPO / "train_loop.py"), "--train_file", str(corpus), "--output_dir", str(scratch / f"train_loop-{run}"),
            "--per_device_train_batch_size", str(args.batch_size), "--save_steps", str(args.max_steps + 1), *shared,
        ],  # fmt: skip
        TRAINER: [*worker, "--worker", "trainer", "--scratch", str(scratch / f"trainer-{run}")],
    }


def paired_ratios(rates: list, base: list) -> str:
    ratios = [rate / base_rate for rate, base_rate in zip(rates, base)]
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"


def add_loop_arguments(parser, logging_steps: int) -> None:
    """The flags every loop benchmark shares: model, data, batch and what is timed."""
    parser.add_argument("--config_name", default=str(REPO / "configs" / "gpt2-small-byte.json"))
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--warmup_steps", type=int, default=20, help="steps before the stopwatch starts")
    parser.add_argument("--measured_steps", type=int, default=100)
    parser.add_argument("--logging_steps", type=int, default=logging_steps)
    parser.add_argument("--corpus_lines", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--max_steps", type=int, default=100_000, help="the schedule's length (never reached)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(argument) for argument in argv]
    if argv[:1] == ["side_by_side"]:
        return side_by_side_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop (alternating)")
    add_loop_arguments(parser, logging_steps=10)
    parser.add_argument("--worker", choices=["plain", "plain-malloc", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--save_steps", type=int, default=0, help=argparse.SUPPRESS)  # the plain loop's direct writes (bench/save_in_loop.py)
    parser.add_argument("--train_file", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        (trainer_loop if args.worker == "trainer" else plain_loop)(args)
        return 0

    first = args.warmup_steps
    last = first + args.measured_steps
    assert first % args.logging_steps == 0 and last % args.logging_steps == 0, "steps must be multiples of --logging_steps"
    from transformers import AutoConfig, AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_name)).parameters())
    rates = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, args.corpus_lines)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}  # one tokenization cache for all runs
        for run in range(args.repeats):
            order = CONTENDERS[run % len(CONTENDERS) :] + CONTENDERS[: run % len(CONTENDERS)]  # rotate: no loop always runs first
            for name in order:
                arrived = step_times(run_until(commands(args, corpus, scratch, run)[name], env, until_step(last), cwd=REPO))
                rates[name].append((last - first) / (arrived[last] - arrived[first]))

    print(f"{Path(args.config_name).name}: {parameters:,} parameters, batch {args.batch_size} x {args.block_size} tokens, "
          f"steps {first}-{last} timed, {args.repeats} runs each, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")  # fmt: skip
    print("Ratios are taken within each round (the four loops back to back), so slow drift of the machine cancels;")
    print("the table gives their median and range over the rounds.\n")
    print("| loop | steps/s (median) | each run | vs plain loop | vs plain loop with the same malloc limits |")
    print("|---|---|---|---|---|")
    for name in CONTENDERS:
        each = ", ".join(f"{rate:.2f}" for rate in rates[name])
        ratios = [paired_ratios(rates[name], rates[base]) for base in (PLAIN, PLAIN_MALLOC)]
        print(f"| {name} | {statistics.median(rates[name]):.2f} | {each} | {ratios[0]} | {ratios[1]} |")
    return 0



# --------------------------------------------------------------------------- side by side, one core each

SIDE_BY_SIDE = """train_loop.py against each other loop at the same moment, one core each.

    .venv/bin/python bench/loop_overhead.py side_by_side [--repeats 4] [--config_name configs/gpt2-small-byte.json]

On this shared machine the speed of one and the same loop drifts by ±20 % within minutes
(BENCHMARKS.md), so loops run one after the other cannot resolve a few percent. Here train_loop.py
and one other loop (the plain loop, the plain loop with train_loop.py's malloc settings, or
transformers.Trainer; the same commands as above) run simultaneously, each pinned
to a core of its own (taskset) with OMP_NUM_THREADS=1, so both meet the same conditions. The cores
are swapped every round. Each loop's rate is taken over the time both were training: from the
later of their step-20 lines to the earlier of their last lines, with step counts interpolated
between progress lines. The table shows the median and range of train_loop.py's speed relative
to each other loop.
"""
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


def side_by_side_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="loop_overhead.py side_by_side", description=SIDE_BY_SIDE.split("\n\n")[0])
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
