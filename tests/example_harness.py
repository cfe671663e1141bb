"""Runs an example script as the real program would run, plus switches that only tests use.

    python tests/example_harness.py examples/NAME.py [the example's flags]

    EXAMPLE_KILL_IN_SAVE=N   SIGKILL this process inside the save of checkpoint-N: after every file of it
                             is written, before its manifest (the commit) is, as a power cut would
    EXAMPLE_KILL_IN_TRAINER_SAVE=N   SIGKILL inside transformers.Trainer's own save of checkpoint-N, after the
                             weights, optimizer and scheduler, before its RNG state and trainer_state.json
    EXAMPLE_STEP_SECONDS=S   every optimizer step takes at least S seconds (a SLURM job that must outlast its time limit)

The switches live here, not in the library: production code reads no test-only environment.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's resumable package, as `pip install .` would give

from resumable import state  # noqa: E402

if kill_at := os.environ.get("EXAMPLE_KILL_IN_SAVE"):
    write_manifest = state.write_manifest

    def write_manifest_or_die(directory, global_step):
        if global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return write_manifest(directory, global_step)

    state.write_manifest = write_manifest_or_die

if kill_at_trainer := os.environ.get("EXAMPLE_KILL_IN_TRAINER_SAVE"):
    from transformers import Trainer

    save_rng_state = Trainer._save_rng_state

    def save_rng_state_or_die(self, output_dir):
        if Path(output_dir).name == f"checkpoint-{kill_at_trainer}":
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng_state(self, output_dir)

    Trainer._save_rng_state = save_rng_state_or_die

if step_seconds := os.environ.get("EXAMPLE_STEP_SECONDS"):
    import time

    from accelerate.optimizer import AcceleratedOptimizer

    optimizer_step = AcceleratedOptimizer.step
    last_step_at = [time.monotonic()]

    def paced_step(self, *args, **kwargs):
        result = optimizer_step(self, *args, **kwargs)
        if self.gradient_state.sync_gradients:  # an optimizer step, not a micro-batch of one
            time.sleep(max(0.0, last_step_at[0] + float(step_seconds) - time.monotonic()))
            last_step_at[0] = time.monotonic()
        return result

    AcceleratedOptimizer.step = paced_step

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
