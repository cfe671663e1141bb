"""Runs train_loop.py as a real process, with test-only instruments switched on from outside.

Production code has no test switches; this wrapper patches it from the outside:
  HARNESS_KILL_IN_SAVE=STEP   SIGKILL this process inside the save of checkpoint-STEP,
                              after every file is written and before the rename
  HARNESS_KILL_IN_DELETE=STEP SIGKILL this process while rotation deletes checkpoint-STEP,
                              after two of its files are gone (manifest.json, model.safetensors)
  HARNESS_SLOW_SAVE=SECONDS   sleep this long inside every save, before the manifest is written
  HARNESS_SLOW_WRITE=SECONDS  --async_save: sleep this long before the background writer writes each file
  HARNESS_HOST_MEMORY=BYTES   --async_save: pretend this much host memory is available
  HARNESS_RECORD_BATCHES=FILE append "step<TAB>sha256 of each micro-batch" per optimizer step
  HARNESS_HIDE_PACKAGES=A,B   make these packages look not installed (e.g. wandb)
  HARNESS_RECORD_SEEDS=FILE   append "step<TAB>sha256=seed of each micro-batch" per optimizer step
  HARNESS_RECORD_READS=FILE   append "scan" when the labels are found by reading the data, and
                              "read<TAB>file<TAB>position" each time --streaming starts reading a file
  HARNESS_KILL_IN_UPLOAD=STEP --backup_to: SIGKILL this process after checkpoint-STEP's files are uploaded, before its manifest
  HARNESS_PAUSE_AFTER=STEP    the training sleeps (10 min) once checkpoint-STEP is saved and reported (with
                              --backup_to, its upload goes on); a test can then act at that point, however fast the training is
  HARNESS_STEP_SECONDS=S      every optimizer step takes at least S seconds (it sleeps the rest): a run that must last
                              (a SLURM time limit, --max_time) without taking the CPU other tests need, and whose
                              speed a faster machine cannot raise
"""

import hashlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resumable import state  # noqa: E402
import train_loop  # noqa: E402

for package in filter(None, os.environ.get("HARNESS_HIDE_PACKAGES", "").split(",")):
    sys.modules[package] = None  # importlib.util.find_spec now answers None, and an import fails

kill_step = os.environ.get("HARNESS_KILL_IN_SAVE")
if kill_step:
    original_finish = state._finish_checkpoint

    def finish_then_die(temporary, final, progress, *args):
        if progress.global_step == int(kill_step):
            state.write_json_atomic(temporary / state.MANIFEST_NAME, {"global_step": progress.global_step, "files": {}})
            os.kill(os.getpid(), signal.SIGKILL)
        return original_finish(temporary, final, progress, *args)

    state._finish_checkpoint = finish_then_die

delete_step = os.environ.get("HARNESS_KILL_IN_DELETE")
if delete_step:
    original_rmtree = shutil.rmtree

    def rmtree_then_die(path, *args, **kwargs):
        name = f"{state.CHECKPOINT_PREFIX}{delete_step}"
        if Path(path).name in (name, state.DELETING_PREFIX + name):  # deleted in place, or moved first
            for name in (state.MANIFEST_NAME, "model.safetensors"):
                (Path(path) / name).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return original_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree_then_die

slow_save = os.environ.get("HARNESS_SLOW_SAVE")
if slow_save:
    original_manifest = state.write_manifest

    def slow_manifest(directory, global_step):
        print(f"harness: inside the save of step {global_step}", flush=True)
        time.sleep(float(slow_save))
        return original_manifest(directory, global_step)

    state.write_manifest = slow_manifest

slow_write = os.environ.get("HARNESS_SLOW_WRITE")
if slow_write:
    from resumable import background_save  # noqa: E402

    original_write_file = background_save._write_file

    def slow_write_file(obj, path, how):
        print(f"harness: writing {path.name} of {path.parent.name}", flush=True)
        time.sleep(float(slow_write))  # the loop trains on meanwhile
        return original_write_file(obj, path, how)

    background_save._write_file = slow_write_file

host_memory = os.environ.get("HARNESS_HOST_MEMORY")
if host_memory:
    from resumable import background_save  # noqa: E402

    background_save.available_host_memory = lambda: int(host_memory)

upload_kill_step = os.environ.get("HARNESS_KILL_IN_UPLOAD")
if upload_kill_step:
    from resumable import backup  # noqa: E402

    original_put_bytes = backup.Destination.put_bytes

    def put_bytes_or_die(self, key, data):
        if key == f"{state.CHECKPOINT_PREFIX}{upload_kill_step}/{state.MANIFEST_NAME}":
            os.kill(os.getpid(), signal.SIGKILL)
        return original_put_bytes(self, key, data)

    backup.Destination.put_bytes = put_bytes_or_die

pause_step = os.environ.get("HARNESS_PAUSE_AFTER")
if pause_step:
    from resumable.saving import StepSaver  # noqa: E402

    original_report = StepSaver._report

    def report_then_pause(self, path, *args):
        original_report(self, path, *args)  # handed to the upload, rotated, reported
        if Path(path).name == f"{state.CHECKPOINT_PREFIX}{pause_step}":
            time.sleep(600)

    StepSaver._report = report_then_pause

record_file = os.environ.get("HARNESS_RECORD_BATCHES")
seeds_file = os.environ.get("HARNESS_RECORD_SEEDS")
if record_file or seeds_file:
    import torch  # noqa: E402

    original_micro_batch = train_loop.train_micro_batch
    this_step = []  # (digest, seed) of each micro-batch of the step in progress

    def recording_micro_batch(accelerator, model, optimizer, scheduler, batch, max_grad_norm):
        step = scheduler.scheduler.last_epoch + 1  # the schedule steps on the step's last micro-batch, inside the call
        # resumable.Run seeded this micro-batch's generator just before handing it out: its seed is that generator's
        this_step.append((hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:16], torch.initial_seed()))
        result = original_micro_batch(accelerator, model, optimizer, scheduler, batch, max_grad_norm)
        if accelerator.sync_gradients:
            if record_file:
                with open(f"{record_file}.rank{accelerator.process_index}", "a") as handle:
                    handle.write(f"{step}\t{','.join(d for d, _ in this_step)}\n")
            if seeds_file:
                with open(f"{seeds_file}.rank{accelerator.process_index}", "a") as handle:
                    handle.write(f"{step}\t{','.join(f'{d}={s}' for d, s in this_step)}\n")
            this_step.clear()
        return result

    train_loop.train_micro_batch = recording_micro_batch

reads_file = os.environ.get("HARNESS_RECORD_READS")
if reads_file:
    from cli import streaming  # noqa: E402

    def record(line):
        with open(reads_file, "a") as handle:
            handle.write(line + "\n")

    original_scan, original_chunks = streaming.stream_label_names, streaming.FilePart.chunks

    def recording_scan(*args, **kwargs):
        record("scan")
        return original_scan(*args, **kwargs)

    def recording_chunks(part, position):
        record(f"read\t{part.path}\t{position}")
        return original_chunks(part, position)

    streaming.stream_label_names, streaming.FilePart.chunks = recording_scan, recording_chunks

step_seconds = os.environ.get("HARNESS_STEP_SECONDS")
if step_seconds:
    unpaced_micro_batch = train_loop.train_micro_batch
    step_began = []

    def paced_micro_batch(accelerator, *args):
        if not step_began:
            step_began.append(time.monotonic())
        result = unpaced_micro_batch(accelerator, *args)
        if accelerator.sync_gradients:  # the step's last micro-batch
            time.sleep(max(0.0, float(step_seconds) - (time.monotonic() - step_began.pop())))
        return result

    train_loop.train_micro_batch = paced_micro_batch

sys.exit(train_loop.run_cli())
