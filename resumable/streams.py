"""Streams in resumable.Run: `run.batches(stream)` for data with no length that remembers its own position.

    is_stream(batches)          whether run.batches was given a stream (anything but a map-style DataLoader)
    begin(batches, accelerator, resumed_checkpoint, num_epochs)
                                this rank's RankStream, at the checkpoint's position after a resume; or UsageError
    RankStream.micro_batches(until)     the stream's micro-batches, epoch after epoch, until `until()` is true
    RankStream.checkpoint_files()       {stream_state_<rank>.pt: bytes}: this rank's position now, for the save of this step
    refuse_stream_checkpoint(checkpoint)    UsageError if a DataLoader run resumes a checkpoint written by a stream run

What a stream is. An iterable whose iteration yields this rank's micro-batches (each rank reads its own
part: the user shards by accelerator.process_index), with state_dict()/load_state_dict(), where
state_dict() is the position just after the last micro-batch yielded, and an iteration after
load_state_dict() goes on from there. That is the contract of torchdata's StatefulDataLoader (it fits;
torchdata is not installed here, so that is untested). A plain torch DataLoader with num_workers=0 over
an IterableDataset that has both methods fits too, through its dataset: with no workers the loader reads
no batch ahead (torch/utils/data/dataloader.py _SingleProcessDataLoaderIter._next_data fetches one batch
per next(), and _utils/fetch.py _IterableDatasetFetcher takes exactly batch_size items from the dataset's
iterator for it), so the dataset's position is the one after the last batch yielded.

Refused, with one line each (UsageError): a stream without state_dict/load_state_dict; a DataLoader whose
workers read ahead (num_workers > 0); Run(num_epochs=...) (a stream has no known length); a checkpoint
written from the other kind of data. A stream checkpoint of another number of processes is refused by Run.start
(a loader's checkpoint resumes on another number of processes; a stream's positions belong to their processes).

Epochs. When the stream's iterator ends, that is the end of an epoch: set_epoch(epoch + 1) is called on
the stream (on the DataLoader's dataset) if it has one, and it is iterated again. A fresh epoch that
yields no batch at all is refused (it would loop forever). The epoch is counted per rank and saved with
the position; Run's epoch is the main process's count of passes completed.

On disk. Each checkpoint holds stream_state_<rank>.pt, {"epoch", "world_size", "position": state_dict()},
written with torch.save by every rank inside the checkpoint directory, so the manifest (size and XXH3
of every file) and the atomic rename cover it. Its bytes are taken on the loop's thread in the save call
of the step (resumable/saving.py StepSaver.rank_files), with a background save too: the writer thread only
writes bytes it was given, it never calls state_dict() later.
"""

from __future__ import annotations

import io
from pathlib import Path

from resumable.errors import UsageError

STREAM_STATE_PATTERN = "stream_state_{rank}.pt"
_END = object()


def _has_state(thing) -> bool:
    return callable(getattr(thing, "state_dict", None)) and callable(getattr(thing, "load_state_dict", None))


def is_stream(batches) -> bool:
    """Anything but a DataLoader over a map-style Dataset (prepared or not) is a stream to run.batches."""
    import torch
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    if isinstance(batches, (DataLoaderShard, DataLoaderDispatcher)):
        return False  # prepared: batches.resumability_problem judges it, and refuses a prepared stream
    if isinstance(batches, torch.utils.data.DataLoader) and not _has_state(batches):
        return isinstance(batches.dataset, torch.utils.data.IterableDataset)
    return True


def position_holder(batches):
    """What remembers the stream's position: the stream itself (a StatefulDataLoader), or a plain DataLoader's dataset."""
    import torch

    if _has_state(batches):
        return batches
    is_loader = isinstance(batches, torch.utils.data.DataLoader)
    holder = batches.dataset if is_loader else batches
    if not _has_state(holder):
        raise UsageError(
            f"run.batches(stream): a stream ({type(holder).__name__}) cannot be resumed at its exact sample without state_dict()/load_state_dict(): "
            "give it both (state_dict() = the position after the last batch it yielded), use torchdata's StatefulDataLoader, "
            "or use a map-style Dataset (one with __len__ and __getitem__) through accelerator.prepare(...)"
        )
    if batches.num_workers:
        raise UsageError(
            f"run.batches(stream): a DataLoader with num_workers={batches.num_workers} reads batches ahead in its workers, so its dataset's "
            "state_dict() is not the position after the last batch trained: pass num_workers=0, or use torchdata's StatefulDataLoader"
        )
    return holder


def begin(batches, accelerator, resumed_checkpoint: Path | None, num_epochs, other_world_size_allowed: bool = False) -> "RankStream":
    """This rank's stream for run.batches; after a resume, at the position the checkpoint holds. UsageError if refused.

    other_world_size_allowed (Run's allow_settings_change): a checkpoint of another number of processes gives every
    rank rank 0's position; a stream that knows better handles it in load_state_dict (the CLI's restarts that epoch).
    """
    if num_epochs is not None:
        raise UsageError("run.batches(stream): a stream has no known length, so Run(num_epochs=...) cannot say where the run ends: give Run(max_steps=N)")
    stream = RankStream(batches, position_holder(batches), accelerator.process_index, accelerator.num_processes)
    if resumed_checkpoint is not None:
        stream.load(Path(resumed_checkpoint), other_world_size_allowed)
    return stream


def saved_stream_state(checkpoint: Path, rank: int) -> dict:
    """A rank's stream record in a checkpoint: {"epoch", "world_size", "position": its state_dict()} (for tools and tests)."""
    import torch

    return torch.load(Path(checkpoint) / STREAM_STATE_PATTERN.format(rank=rank), weights_only=False)  # manifest-verified: see RankStream.load


def write_stream_state(checkpoint: Path, rank: int, record: dict) -> None:
    """Replace a rank's stream record (a benchmark that forges a position; the caller rewrites the manifest)."""
    import torch

    torch.save(record, Path(checkpoint) / STREAM_STATE_PATTERN.format(rank=rank))


def refuse_stream_checkpoint(checkpoint: Path | None) -> None:
    """run.batches(dataloader): a checkpoint written by a stream run holds positions, not a loader's epoch and step."""
    if checkpoint is not None and (Path(checkpoint) / STREAM_STATE_PATTERN.format(rank=0)).is_file():
        raise UsageError(
            f"run.batches(dataloader): {Path(checkpoint).name} was written by a run that iterated a stream (it holds its position, "
            f"{STREAM_STATE_PATTERN.format(rank=0)}): pass the same kind of data as the run that wrote it (or choose another output_dir to start fresh)"
        )


class RankStream:
    """One rank's stream in a Run: its epoch, its position in each checkpoint, its micro-batches epoch after epoch."""

    def __init__(self, batches, holder, rank: int, world_size: int):
        self.batches, self.holder = batches, holder  # iterated; asked for state_dict/load_state_dict/set_epoch
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.resumed = False

    def load(self, checkpoint: Path, other_world_size_allowed: bool = False) -> None:
        """The epoch and position this rank's stream had at the checkpoint's step."""
        import torch

        path = checkpoint / STREAM_STATE_PATTERN.format(rank=self.rank)
        if other_world_size_allowed and not path.is_file():
            path = checkpoint / STREAM_STATE_PATTERN.format(rank=0)
        if not path.is_file():
            raise UsageError(
                f"run.batches(stream): {checkpoint.name} was written by a run that iterated a prepared DataLoader (it holds no {path.name}): "
                "pass the same kind of data as the run that wrote it (or choose another output_dir to start fresh)"
            )
        # weights_only=False: a stream's state is the user's own object (numpy generators, tuples, ...), which
        # weights_only refuses; the manifest has verified every byte of this file before the resume began, and
        # accelerate loads its own RNG pickles the same way.
        saved = torch.load(path, weights_only=False)
        if saved["world_size"] != self.world_size and other_world_size_allowed:
            saved = torch.load(checkpoint / STREAM_STATE_PATTERN.format(rank=0), weights_only=False)
        elif saved["world_size"] != self.world_size:  # Run.start refuses this before (stream_state_0.pt); each rank's position is its own
            raise UsageError(f"run.batches(stream): {path.name} was written by {saved['world_size']} process(es), this run has {self.world_size}: resume with the same number")
        self.epoch = saved["epoch"]
        self._set_epoch(self.epoch)  # as at the start of that epoch; the position loaded next is where it stood
        self.holder.load_state_dict(saved["position"])
        self.resumed = True

    @property
    def reported_epoch(self) -> float:
        """trainer_state.json's epoch: the stream's own, if it counts one (a fraction of its data read), else the passes completed."""
        own = getattr(self.batches, "epoch", None)
        return float(own) if isinstance(own, (int, float)) and not isinstance(own, bool) else float(self.epoch)

    def checkpoint_files(self) -> dict:
        """{stream_state_<rank>.pt: its bytes}: the position after the last micro-batch yielded, taken now, at the save's step."""
        import torch

        record = {"epoch": self.epoch, "world_size": self.world_size, "position": self.holder.state_dict()}
        buffer = io.BytesIO()
        torch.save(record, buffer)  # bytes now: nothing the loop does later can change what is saved
        return {STREAM_STATE_PATTERN.format(rank=self.rank): buffer.getvalue()}

    def micro_batches(self, until):
        """Yield the stream's micro-batches, epoch after epoch; `until()` is asked before each fetch, so none is read beyond the last step."""
        from resumable import state

        resumed_pass = self.resumed
        if not resumed_pass:
            self._set_epoch(self.epoch)
        while True:
            if resumed_pass:
                rng_before = state.capture_rng_state()
                batches = iter(self.batches)
                # A DataLoader draws its base seed from the global torch RNG in iter(); the uninterrupted run drew it at
                # the start of this epoch, before the checkpoint's RNG state was taken: undo it, or dropout would differ.
                state.restore_rng_state(rng_before)
            else:
                batches = iter(self.batches)
            yielded = 0
            while not until():
                batch = next(batches, _END)
                if batch is _END:
                    break
                yielded += 1
                yield batch
            else:  # until() is true: the run's last step is taken, or it stops here
                return
            if not yielded and not resumed_pass:  # a resumed pass may be empty: saved just after an epoch's last batch
                raise UsageError(
                    f"run.batches(stream): epoch {self.epoch} of the stream yielded no batch, so the run would never end: make the stream "
                    "start again after an epoch ends (set_epoch(epoch) is called before each one, if it has it) and yield at least one batch"
                )
            self.epoch += 1
            resumed_pass = False
            self._set_epoch(self.epoch)

    def _set_epoch(self, epoch: int) -> None:
        if callable(set_epoch := getattr(self.holder, "set_epoch", None)):
            set_epoch(epoch)
