"""Benchmark: examples/digits_classifier.py with the library against the same loop without it, taking turns.

    .venv/bin/python bench/library_overhead.py [--steps 3000] [--rounds 5] [--save_steps 200] [--turn_steps 50] [--core N] [--async_save]

Three programs (four with --async_save) run at once and take turns: one trains --turn_steps steps while the
others wait at a step boundary, then hands over to the next, until each has trained --steps. Each times only
its own turns, from its first batch to its last step (for C and D to the end of finish()'s wait for a save
still being written). Why turns: this machine's speed drifts by ~10 % between runs a minute apart, as much as
the few percent measured; taking turns every ~0.15 s gives every program the same share of each drift. All run
on one core (--core, default the last one this process may use), so that none is measured on a faster one.
  A  the plain loop: the example's Dataset, model, optimizer, schedule and lines, no checkpoints at all;
  B  the plain loop with accelerator.save_state(...) every --save_steps, as a user would checkpoint by hand;
  C  examples/digits_classifier.py as it ships (resumable.Run, a verified checkpoint every --save_steps);
  D  with --async_save: the same with its --async_save (Run(async_save=True): the checkpoints written on a thread).
     D hands over only when no save of its own is in flight: its writer thread would otherwise run in
     another program's turn.
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

# Both programs' side of the turns: the bench writes one byte to TURN_GO when it is this program's turn, and
# waits for one on TURN_READY when it hands over (or for end of file when it exits).
TURNS = """
import os, time
class Turns:
    def __init__(self):
        self.go, self.ready = int(os.environ["TURN_GO"]), int(os.environ["TURN_READY"])
        self.seconds, self.since = 0.0, None
    def hand_over(self):  # at a step boundary: stop this program's clock until its next turn
        if self.since is not None:
            self.seconds += time.perf_counter() - self.since
        os.write(self.ready, b".")
        os.read(self.go, 1)
        self.since = time.perf_counter()
    def end(self, at):
        self.seconds += at - self.since
turns = Turns()
"""

# The example as it ships, timed from its first batch (after run.start()) to its last run.step() or the
# last wait for a save in flight (finish() waits for the final step's background save).
WITH_LIBRARY = TURNS + """
import runpy, sys
sys.path.insert(0, {repo!r})
import resumable.run
start, step = resumable.run.Run.start, resumable.run.Run.step
marks = {{}}
def timed_start(self):
    result = start(self)
    turns.hand_over()
    return result
def timed_step(self, **values):
    result = step(self, **values)
    marks["ended"] = time.perf_counter()
    if self.global_step % {turn_steps} == 0 and self.global_step < {steps} and not self.deadline.save_in_flight:
        turns.hand_over()
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
turns.end(marks["ended"])
print(f"LOOP {{{steps} / turns.seconds}}")
"""

# The same loop with the library's lines taken out (and, for B, accelerator.save_state put in).
PLAIN = TURNS + """
import sys, torch
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
turns.hand_over()
while done < steps:
    loader.set_epoch(epoch)
    for images, labels in loader:
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)  # the example's line (for its --stream)
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
        if done % {turn_steps} == 0:
            turns.hand_over()
    epoch += 1
turns.end(time.perf_counter())
print(f"LOOP {{steps / turns.seconds}}")
"""


def taking_turns(programs: list[str]) -> list[float]:
    """Start every program at once, give each its turns in rotation until all have exited; each one's steps/s."""
    running = []
    for program in programs:
        go_read, go_write = os.pipe()
        ready_read, ready_write = os.pipe()
        environment = dict(os.environ, TURN_GO=str(go_read), TURN_READY=str(ready_write))
        process = subprocess.Popen([sys.executable, "-c", program], env=environment, pass_fds=(go_read, ready_write),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        os.close(go_read)
        os.close(ready_write)  # the program's exit then reads as end of file
        running.append((process, go_write, ready_read))
    try:
        waiting = [entry for entry in running if os.read(entry[2], 1)]  # each one's start-up, all at once, untimed
        while waiting:
            for entry in list(waiting):
                os.write(entry[1], b".")
                if not os.read(entry[2], 1):  # its loop is done and it has exited
                    waiting.remove(entry)
        rates = []
        for process, _, _ in running:
            stdout, stderr = process.communicate(timeout=1800)
            lines = [line for line in stdout.splitlines() if line.startswith("LOOP ")]
            if process.returncode != 0 or not lines:
                raise SystemExit(f"a benchmark program failed (exit {process.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
            rates.append(float(lines[-1].split()[1]))
        return rates
    finally:
        for process, go_write, ready_read in running:
            process.kill() if process.poll() is None else None
            os.close(go_write)
            os.close(ready_read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--save_steps", type=int, default=200)
    parser.add_argument("--turn_steps", type=int, default=50, help="steps a program trains before it hands over to the next")
    parser.add_argument("--core", type=int, default=max(os.sched_getaffinity(0)), help="the one core every program runs on")
    parser.add_argument("--async_save", action="store_true", help="also time the example with --async_save (D)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})  # the programs inherit it
    names = ["plain loop", "plain loop + accelerator.save_state", "resumable (examples/digits_classifier.py)"]
    if args.async_save:
        names.append("resumable, --async_save")
    measured = {name: [] for name in names}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as directory:
            common = dict(steps=args.steps, save_steps=args.save_steps, turn_steps=args.turn_steps)
            programs = [PLAIN.format(save=False, output_dir=f"{directory}/a", example_dir=str(EXAMPLE.parent), **common),
                        PLAIN.format(save=True, output_dir=f"{directory}/b", example_dir=str(EXAMPLE.parent), **common)]  # fmt: skip
            example = dict(repo=str(REPO), example=str(EXAMPLE), **common)
            programs.append(WITH_LIBRARY.format(output_dir=f"{directory}/c", extra=[], **example))
            if args.async_save:
                programs.append(WITH_LIBRARY.format(output_dir=f"{directory}/d", extra=["--async_save"], **example))
            for name, rate in zip(names, taking_turns(programs)):
                measured[name].append(rate)
    library = measured[names[2]]
    print(f"{args.steps} steps, a save every {args.save_steps} (B, C{', D' if args.async_save else ''}), {args.rounds} rounds, turns of {args.turn_steps} steps on core {args.core}, threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
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
