"""Checkpoints written in the background (the CLI's --async_save true, resumable.Run(async_save=True)): the loop stops only to copy the state.

    BackgroundSaver.start(...)   at a save step, every rank: snapshot, then return to training
    BackgroundSaver.poll()       at every step boundary, every rank: the save that just became visible, if any
    BackgroundSaver.wait()       every rank: block until the save in flight is visible (stop, end, next save)
    snapshot_fits(...)           whether one more copy of the state fits in host memory

The files are the ones `state.save_checkpoint` writes (what `accelerator.save_state` writes, then
software.json, trainer_state.json, training_args.json and manifest.json), byte for byte, into the same
`.tmp-checkpoint-<step>`, renamed by the same `state._finish_checkpoint`.

The contract of a background save:

What it snapshots. In `start`, on the loop's thread, before the next optimizer step:
  - this rank's RNG file, written at once by accelerate's own `save_accelerator_state` (a few KB);
  - on the process that writes them (the main process), the model's state dict and each
    optimizer's, scheduler's, sampler's and grad scaler's state, and the state_dict() of each
    object registered for checkpointing (resumable.Run.register), copied into host buffers that
    the saver owns and reuses from save to save (tensors that share storage, such as tied
    embeddings, share it in the copy too, so safetensors stores them once as save_state does);
  - the progress, log_history, run_history and run arguments (copies).
  Nothing the loop does afterwards can change a byte of it: the buffers are written only by a
  snapshot, and a snapshot begins only after the previous save's writer has finished.

When it becomes visible. A thread per rank writes its files and fsyncs them. The ranks agree that
every rank's files are durable at step boundaries, from the loop's thread, by a non-blocking
all-reduce on a gloo group of the saver's own (never concurrently with the loop's collectives,
never from the thread). Then the main process's thread runs `state._finish_checkpoint`: manifest
last, rename to `checkpoint-<step>`, fsync of the parent. Only after that does `poll` (or `wait`)
return the result, on every rank at the same step; rotation and the "Saved" line come after it.

How its errors reach the loop. An error in any rank's thread is kept, and raised by `poll` or
`wait` on every rank at the same step boundary as `state.SaveFailed`, with the message a
synchronous save gives; the main process first removes the temporary directory, once no rank's
thread is still writing into it. Earlier checkpoints are never touched. An error that is not an
I/O error (a bug) is raised as itself. A kill at any moment leaves only `.tmp-checkpoint-<step>`,
which the next start removes.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from resumable import state

# accelerate's save_state cannot be split into "copy" and "write", so the writer below repeats its
# loop for the kinds of run it supports; tests/test_async_save.py compares the files byte for byte.
UNSUPPORTED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


def unsupported_reason(accelerator) -> str | None:
    """Why this run cannot save in the background, or None if it can."""
    if accelerator.distributed_type.value.upper() in UNSUPPORTED:
        return f"{accelerator.distributed_type.value} saves its own sharded state"
    if accelerator._save_model_state_pre_hook:
        return "save hooks registered with accelerator.register_save_state_pre_hook"
    return None


# --------------------------------------------------------------------------- the snapshot


class HostBuffers:
    """Host copies of tensors, in buffers kept from one snapshot to the next (pinned when there is a GPU).

    Reusing the buffers means a snapshot after the first one allocates nothing: no page faults,
    and no growth of the process's memory from save to save.
    """

    def __init__(self):
        self.pinned = torch.cuda.is_available()
        self.buffers: list[torch.Tensor] = []  # one uint8 buffer per distinct storage, in visiting order
        self.copiers = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="snapshot")

    def copy(self, tree):
        """The same nested dicts/lists/tuples with every tensor replaced by a host copy of it.

        Call it once per snapshot with everything in it: the buffers are assigned in visiting order.
        """
        memo = {}  # (device, storage pointer) of a live storage -> the storage of its copy
        host_copies = []  # (destination, source, bytes) of the storages in host memory
        copied = self._visit(tree, memo, iter(range(1 << 62)), host_copies)
        # Plain memcpys, on a few threads (memmove releases the GIL): torch's copy_ would open a
        # parallel region per tensor, and with the cores busy each region can wait a time slice.
        list(self.copiers.map(lambda job: ctypes.memmove(*job), host_copies))
        return copied

    def _visit(self, item, memo, order, host_copies):
        if isinstance(item, torch.Tensor):
            return self._copy_tensor(item, memo, order, host_copies)
        if isinstance(item, dict):
            copied = type(item)((key, self._visit(value, memo, order, host_copies)) for key, value in item.items())
            if hasattr(item, "_metadata"):  # a state dict's version record, pickled with it
                copied._metadata = copy.deepcopy(item._metadata)
            return copied
        if isinstance(item, (list, tuple)) and type(item) in (list, tuple):
            return type(item)(self._visit(value, memo, order, host_copies) for value in item)
        if isinstance(item, (int, float, str, bool, type(None))):
            return item  # immutable
        return copy.deepcopy(item)

    def _copy_tensor(self, tensor: torch.Tensor, memo, order, host_copies) -> torch.Tensor:
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            return tensor.to("cpu", copy=True)
        key = (tensor.device, storage.data_ptr())
        if key not in memo:
            index = next(order)
            if index == len(self.buffers):
                self.buffers.append(None)
            buffer = self.buffers[index]
            if buffer is None or buffer.numel() != storage.nbytes():
                buffer = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=self.pinned)
                self.buffers[index] = buffer
            if tensor.is_cuda:
                live_bytes = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
                buffer.copy_(live_bytes, non_blocking=True)  # into pinned memory; the writer waits for it
            else:
                host_copies.append((buffer.data_ptr(), storage.data_ptr(), storage.nbytes()))
            memo[key] = buffer.untyped_storage()
        # The copy keeps the live tensor's offset, shape and strides inside its (copied) storage.
        return torch.empty(0, dtype=tensor.dtype).set_(memo[key], tensor.storage_offset(), tensor.size(), tensor.stride())


def state_to_write(accelerator) -> dict:
    """The live objects save_state writes, as (file name -> object to save, safetensors?), on this rank.

    Follows accelerate's save_accelerator_state for runs without FSDP/DeepSpeed: only the main
    process writes these files (`accelerate.utils.save` with save_on_each_node=False).
    """
    from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler
    from accelerate.utils import OPTIMIZER_NAME, SAFE_WEIGHTS_NAME, SAMPLER_NAME, SCALER_NAME, SCHEDULER_NAME

    if not accelerator.is_main_process:
        return {}
    files = {}
    for i, model in enumerate(accelerator._models):
        name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
        files[name] = (accelerator.get_state_dict(model, unwrap=False), True)
    for i, optimizer in enumerate(accelerator._optimizers):
        files[f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"] = (optimizer.state_dict(), False)
    for i, scheduler in enumerate(accelerator._schedulers):
        files[f"{SCHEDULER_NAME}.bin" if i == 0 else f"{SCHEDULER_NAME}_{i}.bin"] = (scheduler.state_dict(), False)
    for i, dataloader in enumerate(accelerator._dataloaders):
        if isinstance(dataloader.dataset, IterableDatasetShard):
            sampler = dataloader.get_sampler()
            if isinstance(sampler, SeedableRandomSampler):
                files[f"{SAMPLER_NAME}.bin" if i == 0 else f"{SAMPLER_NAME}_{i}.bin"] = (sampler, False)
        if getattr(dataloader, "use_stateful_dataloader", False):
            files["dl_state_dict.bin" if i == 0 else f"dl_state_dict_{i}.bin"] = (dataloader.state_dict(), "torch")
    if accelerator.scaler is not None:
        files[SCALER_NAME] = (accelerator.scaler.state_dict(), "torch")
    for i, obj in enumerate(accelerator._custom_objects):  # register_for_checkpointing (resumable.Run.register): save_custom_state's file
        files[f"custom_checkpoint_{i}.pkl"] = (obj.state_dict(), False)
    return files


def snapshot_bytes(accelerator) -> int:
    """Host memory one snapshot of this rank's state takes (each shared storage counted once)."""
    seen, total = set(), 0

    def visit(item):
        nonlocal total
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if (item.device, storage.data_ptr()) not in seen:
                seen.add((item.device, storage.data_ptr()))
                total += storage.nbytes()
        elif isinstance(item, dict):
            for value in item.values():
                visit(value)
        elif isinstance(item, (list, tuple)):
            for value in item:
                visit(value)

    for obj, _ in state_to_write(accelerator).values():
        visit(obj)
    return total


def available_host_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, or less under a cgroup memory limit."""
    available = None
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available if available is not None else 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available if available is not None else 1 << 62


def snapshot_fits(needed: int) -> tuple[bool, int]:
    """(whether `needed` more bytes leave 10 % of the available memory free, the available bytes)."""
    available = available_host_memory()
    return needed <= 0.9 * available, available


def _write_file(obj, path: Path, how) -> None:
    """Write one of save_state's files from a snapshot, as save_accelerator_state does, and fsync it."""
    from accelerate.utils import save as accelerate_save

    if how == "bytes":
        state.write_rank_file(path, obj)
        return
    if how == "torch":
        torch.save(obj, path)  # save_accelerator_state writes these with torch.save directly
    else:
        accelerate_save(obj, path, safe_serialization=how)
    state._fsync_path(path)


# --------------------------------------------------------------------------- one save in flight


@dataclasses.dataclass
class Saved:
    """A background save that became visible."""

    path: Path
    reason: str
    blocked_seconds: float  # the loop's pause in `start`
    write_seconds: float  # from the start of the snapshot until the checkpoint was renamed into place


class _Save:
    """One background save: the thread that writes it and what the ranks know about it."""

    def __init__(self, temporary: Path, final: Path, reason: str, began: float):
        self.temporary, self.final, self.reason, self.began = temporary, final, reason, began
        self.blocked_seconds = 0.0
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.durable = threading.Event()  # this rank's files are fsynced, or its thread failed
        self.go_finish = threading.Event()  # every rank's files are durable (main process: finish now)
        self.abort = False  # another rank failed: the main process's thread must not finish
        self.finished = threading.Event()  # this rank's thread has ended
        self.finished_at = 0.0
        self.phase = "writing"  # then "finishing" once every rank is durable
        self.pending = None  # (work, counts) of the all-reduce started at the previous step boundary


class BackgroundSaver:
    """Writes each checkpoint on a thread while the loop trains on; see the module docstring for the contract."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.buffers = HostBuffers()
        self.save: _Save | None = None
        self.group = None
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            # Its own gloo group: its all-reduces run beside the loop's, and off the GPU.
            self.group = dist.new_group(backend="gloo")

    def snapshot_bytes(self) -> int:
        return snapshot_bytes(self.accelerator)

    def snapshot_fits(self, needed: int) -> tuple[bool, int]:
        return snapshot_fits(needed)

    def start(self, model, output_dir: Path, progress, log_history: list, run_history: list, training_args: dict, reason: str, began: float,
              rank_files: dict | None = None) -> None:  # fmt: skip
        """Snapshot this step's state and start writing it. Every rank, with no save in flight (`wait` first).

        `began` is when the loop stopped for this save (before it waited for the previous one).
        Raises NotEnoughDiskSpace or SaveFailed (on every rank) if the checkpoint cannot be begun.
        """
        from accelerate.checkpointing import save_accelerator_state

        assert self.save is None, "wait() for the save in flight first"
        temporary, final = state.begin_checkpoint(self.accelerator, model, output_dir, progress.global_step)
        save = _Save(temporary, final, reason, began)
        files = {}
        try:
            # accelerate's own code writes this rank's RNG file (nothing else with empty lists): it
            # reads the global generators, which the next step changes, so it is written now.
            save_accelerator_state(str(temporary), [], [], [], [], self.accelerator.process_index, self.accelerator.step, None)
            live = state_to_write(self.accelerator)
            copies = self.buffers.copy({name: obj for name, (obj, _) in live.items()})  # one call: buffers by visiting order
            files = {name: (copies[name], how) for name, (_, how) in live.items()}
            files.update({name: (data, "bytes") for name, data in (rank_files or {}).items()})
        except (OSError, RuntimeError) as error:  # e.g. no host memory for the copy: every rank hears of it as SaveFailed
            save.error = error
        copies_ready = None
        if self.buffers.pinned and torch.cuda.is_available():
            copies_ready = torch.cuda.Event()
            copies_ready.record()  # the writer waits for the device-to-host copies, the loop does not
        checkpoint_record = (
            copy.deepcopy(progress), list(log_history), list(run_history),  # deep: the loop goes on changing its progress's lists and dicts
            copy.deepcopy(training_args), state.software_record(self.accelerator.device.type),
        )  # fmt: skip
        save.go_finish_needed = self.accelerator.num_processes > 1
        if not save.go_finish_needed:
            save.go_finish.set()
        save.thread = threading.Thread(
            target=self._write, args=(save, files, copies_ready, checkpoint_record), name=f"save-{final.name}", daemon=True
        )  # daemon: a kill or os._exit must not wait for it; the temporary directory is then left for the next start
        save.thread.start()
        save.blocked_seconds = time.monotonic() - began
        self.save = save

    def _write(self, save: _Save, files: dict, copies_ready, checkpoint_record) -> None:
        """The thread: this rank's files, fsynced; then, on the main process once all ranks are durable, the finish."""
        try:
            if save.error is None:
                if copies_ready is not None:
                    copies_ready.synchronize()
                for name, (obj, how) in files.items():
                    _write_file(obj, save.temporary / name, how)
                state._fsync_path(save.temporary / state.RNG_FILE_PATTERN.format(rank=self.accelerator.process_index))
        except BaseException as error:  # kept for the loop, which raises it at a step boundary
            save.error = error
        save.durable.set()
        try:
            if save.error is None and self.accelerator.is_main_process:
                save.go_finish.wait()
                if not save.abort:
                    state._finish_checkpoint(save.temporary, save.final, *checkpoint_record)
        except BaseException as error:
            save.error = error
        save.finished_at = time.monotonic()
        save.finished.set()

    # ---- agreement, from the loop's thread only

    def _my_counts(self, save: _Save) -> tuple[int, int]:
        """(done, failed) for this rank in the current phase."""
        if save.phase == "writing":
            if not save.durable.is_set():
                return 0, 0
            return (0, 1) if save.error is not None else (1, 0)
        if not self.accelerator.is_main_process:
            return 1, 0
        if not save.finished.is_set():
            return 0, 0
        return (0, 1) if save.error is not None else (1, 0)

    def _all_reduce(self, counts: tuple[int, int], wait: bool):
        import torch.distributed as dist

        tensor = torch.tensor(counts, dtype=torch.int64)
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        if wait:
            work.wait()
        return work, tensor

    def _act(self, counts: tuple[int, int]) -> Saved | None:
        """What every rank does with the same summed counts: nothing yet, next phase, fail, or done."""
        save = self.save
        done, failed = counts
        if done + failed < self.accelerator.num_processes:
            return None  # a rank is still writing
        if failed:
            self._fail(save)
        if save.phase == "writing" and save.go_finish_needed:
            save.phase = "finishing"
            save.go_finish.set()  # the main process's thread renames; the next rounds wait for it
            return None
        save.thread.join()
        self.save = None
        return Saved(save.final, save.reason, save.blocked_seconds, save.finished_at - save.began)

    def _fail(self, save: _Save) -> None:
        save.abort = True
        save.go_finish.set()
        save.thread.join()  # no rank's thread writes any more (each reported), ours has ended too
        self.save = None
        if self.accelerator.is_main_process:
            shutil.rmtree(save.temporary, ignore_errors=True)
        error = save.error
        if error is not None and not isinstance(error, (OSError, RuntimeError)):
            raise error  # not an I/O failure: a bug, with its traceback
        reason = error or ("on the main process" if save.phase == "finishing" else "another rank failed to write its files")
        raise state.SaveFailed(f"saving {save.final.name} failed ({reason}); earlier checkpoints are untouched")

    def poll(self) -> Saved | None:
        """At a step boundary, every rank: the save that became visible since the last call, or None.

        Raises SaveFailed (on every rank at the same call) if the save in flight failed.
        """
        save = self.save
        if save is None:
            return None
        if self.group is None:  # one process: its own thread is the whole story
            if not save.finished.is_set():
                return None
            return self._act((0, 1) if save.error is not None else (1, 0))
        if save.pending is not None:
            work, counts = save.pending
            work.wait()  # started a step ago: long finished
            save.pending = None
            result = self._act(tuple(counts.tolist()))
            if self.save is None:
                return result
        save.pending = self._all_reduce(self._my_counts(save), wait=False)
        return None

    def wait(self) -> Saved | None:
        """Every rank: block until the save in flight is visible (or raise SaveFailed); its result."""
        while self.save is not None:
            save = self.save
            if self.group is None:
                save.finished.wait()
                return self._act((0, 1) if save.error is not None else (1, 0))
            if save.pending is not None:  # the round every rank started at the last step boundary
                work, counts = save.pending
                work.wait()
                save.pending = None
                result = self._act(tuple(counts.tolist()))
            else:
                # Contribute only once our own part is settled, so one round decides each phase.
                (save.durable if save.phase == "writing" else save.finished).wait()
                result = self._act(tuple(self._all_reduce(self._my_counts(save), wait=True)[1].tolist()))
            if self.save is None:
                return result
        return None
