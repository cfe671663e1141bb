"""How the batch is laid out on this world size, and the CLI's words for resumable.Run's messages.

    CLI_WORDING                         resumable.starting.Wording: the flags' names in Run's lines
    plan_batches(...)                   per-rank batch and accumulation that keep a checkpoint's
                                        global batch on a different number of processes (found by
                                        run.find_checkpoint(), before the data and the schedule are built)
"""

from __future__ import annotations

import dataclasses

from cli.config import TrainingConfig, UsageError
from resumable import starting
from resumable.state import TrainingState


# The library's start, in the CLI's words.
CLI_WORDING = starting.Wording(
    output_dir="--output_dir", backup_to="--backup_to", resume_from="--resume_from_checkpoint",
    start_fresh="pass --resume_from_checkpoint none to start fresh",
    train_again="to train again from step 0 (overwriting it), add --resume_from_checkpoint none",
    save_steps="--save_steps", async_save="--async_save", backup_timeout="--backup_timeout", allow_settings_change="--allow_config_change",
)  # fmt: skip


@dataclasses.dataclass
class BatchPlan:
    per_device: int
    accumulation: int
    global_batch: int
    note: str | None = None


def plan_batches(config: TrainingConfig, world_size: int, checkpoint_state: TrainingState | None) -> BatchPlan:
    """Per-rank batch, accumulation and global batch; keeps a checkpoint's global batch on a new world size.

    With --streaming another number of processes is refused first (each reads its own part of the
    stream), or with --allow_config_change noted beside the layout's own note.
    """
    stream_note = None
    if config.streaming:
        from cli import streaming

        stream_note = streaming.check_world_size(checkpoint_state, world_size, config.allow_config_change)
    plan = _keep_the_global_batch(config, world_size, checkpoint_state)
    plan.note = "\n".join(filter(None, [stream_note, plan.note])) or None
    return plan


def _keep_the_global_batch(config: TrainingConfig, world_size: int, checkpoint_state: TrainingState | None) -> BatchPlan:
    per_device = config.per_device_train_batch_size
    accumulation = config.gradient_accumulation_steps
    if checkpoint_state is None or checkpoint_state.world_size == world_size:
        return BatchPlan(per_device, accumulation, per_device * accumulation * world_size)
    global_batch = checkpoint_state.global_batch_size
    per_device = checkpoint_state.per_device_train_batch_size
    if global_batch % (per_device * world_size):
        raise UsageError(
            f"the checkpoint's global batch {global_batch} cannot be split over {world_size} processes of "
            f"{per_device} samples; resume with a number of processes that divides {global_batch // per_device}, "
            "or start over with --resume_from_checkpoint none"
        )
    accumulation = global_batch // (per_device * world_size)
    note = (
        f"🔀 world size {checkpoint_state.world_size} → {world_size}: gradient accumulation "
        f"{checkpoint_state.gradient_accumulation_steps} → {accumulation}, global batch {global_batch} unchanged"
    )
    return BatchPlan(per_device, accumulation, global_batch, note)
