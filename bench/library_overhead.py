"""Benchmark: examples/digits_classifier.py with the library against the same loop without it, side by side.

    .venv/bin/python bench/library_overhead.py [--steps 3000] [--rounds 5] [--save_steps 200] [--async_save]

Three programs (four with --async_save), each started fresh, in alternation (round 1: A B C, round 2:
A B C, ...), and the loop's own time measured inside the process (from the first batch to the last step;
for C and D to the end of finish()'s wait for a save still being written), so start-up does not blur a
few-percent difference:
  A  the plain loop: the example's Dataset, model, optimizer and schedule, no checkpoints at all;
  B  the plain loop with accelerator.save_state(...) every --save_steps, as a user would checkpoint by hand;
  C  examples/digits_classifier.py as it ships (resumable.Run, a verified checkpoint every --save_steps);
  D  with --async_save: the same with its --async_save (Run(async_save=True): the checkpoints written on a thread).
Prints a Markdown table: steps/s per program (median of the rounds) and C / A, C / B per round; with
--async_save, also D / C per round (what background saves gain or lose against synchronous ones).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "digits_classifier.py"

# The example as it ships, timed from its first batch (after run.start()) to its last run.step() or the
# last wait for a save in flight (finish() waits for the final step's background save).
WITH_LIBRARY = """
import runpy, sys, time
sys.path.insert(0, {repo!r})
import resumable.run
start, step = resumable.run.Run.start, resumable.run.Run.step
marks = {{}}
def timed_start(self):
    result = start(self)
    marks["began"] = time.perf_counter()
    return result
def timed_step(self, **values):
    result = step(self, **values)
    marks["ended"] = time.perf_counter()
    return result
resumable.run.Run.start, resumable.run.Run.step = timed_start, timed_step
import resumable.saving
wait = resumable.saving.StepSaver.wait
def timed_wait(self):
    result = wait(self)
    marks["ended"] = time.perf_counter()  # finish() waits for the last background save: its write counts (D)
    return result
resumable.saving.StepSaver.wait = timed_wait
sys.argv = [{example!r}, "--output_dir", {output_dir!r}, "--max_steps", "{steps}", "--save_steps", "{save_steps}", *{extra!r}]
try:
    runpy.run_path({example!r}, run_name="__main__")
except SystemExit:
    pass
print(f"LOOP {{{steps} / (marks['ended'] - marks['began'])}}")
"""

# The same loop with the library's lines taken out (and, for B, accelerator.save_state put in).
PLAIN = """
import sys, time, torch
sys.path.insert(0, {example_dir!r})
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from sklearn.datasets import load_digits
from digits_classifier import Digits, small_cnn
steps, save_steps, save = {steps}, {save_steps}, {save}
set_seed(0)
accelerator = Accelerator(cpu=not torch.cuda.is_available(), dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0), step_scheduler_with_optimizer=False)
images, labels = load_digits(return_X_y=True)
train = Digits(images[:1500], labels[:1500])
model = small_cnn()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, drop_last=True)
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
model.train()
done, epoch = 0, 0
began = time.perf_counter()
while done < steps:
    loader.set_epoch(epoch)
    for images, labels in loader:
        with accelerator.accumulate(model):  # the example's loop (accumulation 1): the user's, not the library's
            logits = model(images)
            loss = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        done += 1
        if save and done % save_steps == 0:
            accelerator.save_state({output_dir!r} + f"/checkpoint-{{done}}")
        if done == steps:
            break
    epoch += 1
print(f"LOOP {{steps / (time.perf_counter() - began)}}")
"""


def steps_per_second(program: str) -> float:
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    lines = [line for line in result.stdout.splitlines() if line.startswith("LOOP ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"a benchmark program failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save_steps", type=int, default=200)
    parser.add_argument("--async_save", action="store_true", help="also time the example with --async_save (D)")
    args = parser.parse_args()
    names = ["plain loop", "plain loop + accelerator.save_state", "resumable (examples/digits_classifier.py)"]
    if args.async_save:
        names.append("resumable, --async_save")
    measured = {name: [] for name in names}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as directory:
            common = dict(steps=args.steps, save_steps=args.save_steps, example_dir=str(EXAMPLE.parent))
            measured[names[0]].append(steps_per_second(PLAIN.format(save=False, output_dir=f"{directory}/a", **common)))
            measured[names[1]].append(steps_per_second(PLAIN.format(save=True, output_dir=f"{directory}/b", **common)))
            example = dict(repo=str(REPO), example=str(EXAMPLE), steps=args.steps, save_steps=args.save_steps)
            measured[names[2]].append(steps_per_second(WITH_LIBRARY.format(output_dir=f"{directory}/c", extra=[], **example)))
            if args.async_save:
                measured[names[3]].append(steps_per_second(WITH_LIBRARY.format(output_dir=f"{directory}/d", extra=["--async_save"], **example)))
    library = measured[names[2]]
    print(f"{args.steps} steps, a save every {args.save_steps} (B, C{', D' if args.async_save else ''}), {args.rounds} rounds, threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| program | steps/s (median) | each round | resumable / this: median (each round) |")
    print("|---|---|---|---|")
    for name in names:
        ratios = [mine / theirs for mine, theirs in zip(library, measured[name])]
        each = ", ".join(f"{value:.1f}" for value in measured[name])
        print(f"| {name} | {statistics.median(measured[name]):.1f} | {each} | {statistics.median(ratios):.3f}x ({', '.join(f'{r:.3f}' for r in ratios)}) |")
    if args.async_save:
        gains = [background / synchronous for background, synchronous in zip(measured[names[3]], library)]
        print(f"\n--async_save / synchronous saves (D / C): {statistics.median(gains):.3f}x ({', '.join(f'{g:.3f}' for g in gains)})")


if __name__ == "__main__":
    main()
