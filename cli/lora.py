"""LoRA (--use_lora): adapters on a frozen base model, and checkpoints that hold only what trains.

    base_model_fingerprint(model)        XXH3-128 over every weight of the base, recorded in each
                                         checkpoint: a resume on another base is refused (exit 2)
    add_adapters(model, config)          peft's LoRA with --lora_r/--lora_alpha/--lora_dropout/
                                         --lora_target_modules; everything else is frozen
    checkpoint_only_what_trains(acc.)    Accelerate save/load pre-hooks: model.safetensors in a
                                         checkpoint holds the adapter weights only (the optimizer,
                                         scheduler, RNG and progress are saved as for any run)
    merged(model)                        the base with the adapter folded in, a plain transformers model

A checkpoint is still written by `accelerator.save_state` and read by `load_state` (state.py); the
hooks only narrow what goes into and comes out of model.safetensors. The frozen base is never
written: it is rebuilt from --model_name_or_path (or the config and seed) at every start, and the
fingerprint proves it is the same one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from resumable import state
from cli.config import TrainingConfig, UsageError

# Notes from peft and transformers that ask nothing of the user, printed at every start and end.
warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # GPT-2's Conv1D: peft sets it right itself
warnings.filterwarnings("ignore", message="Could not find a config file in")  # a base built from a config file, at the final save
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # peft asks transformers' old name


def base_model_fingerprint(model) -> str:
    """A digest of every tensor of the model's state (names, dtypes, shapes, bytes), in name order."""
    import torch
    import xxhash

    digest = xxhash.xxh3_128()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)  # no copy beyond the device transfer
    return digest.hexdigest()


def add_adapters(model, config: TrainingConfig):
    """The model wrapped by peft with LoRA adapters; only the adapters (and a classifier head) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = config.lora_target_modules
    if targets and targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    task = None if config.model_module else {"causal-lm": TaskType.CAUSAL_LM, "sequence-classification": TaskType.SEQ_CLS}[config.task]
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets or None, task_type=task)
    try:
        return get_peft_model(model, lora_config)
    except ValueError as error:  # no default targets for this model type, or a name that matches nothing
        raise UsageError(f"--use_lora: {str(error).splitlines()[0]} (set --lora_target_modules, e.g. all-linear)") from None


def recorded_settings(config: TrainingConfig, base_fingerprint: str) -> dict:
    """What a LoRA checkpoint records beside the flags, to refuse a resume that would not continue it."""
    return {
        "lora": {"r": config.lora_r, "alpha": config.lora_alpha, "dropout": config.lora_dropout, "target_modules": config.lora_target_modules},
        "base_model_fingerprint": base_fingerprint,
    }


def checkpoint_only_what_trains(accelerator) -> None:
    """Make save_state write, and load_state read, only the trainable weights into model.safetensors."""

    def keep_what_trains(models, weights, output_dir):
        for model, weight in zip(models, weights):
            weight.clear()  # the frozen base is rebuilt at every start; only the adapter is new
            weight.update(state.trainable_weights(accelerator.unwrap_model(model)))

    def load_what_trains(models, input_dir):
        for index, model in enumerate(models):
            name = "model.safetensors" if index == 0 else f"model_{index}.safetensors"
            state.load_model_weights(accelerator.unwrap_model(model), Path(input_dir) / name)
        models.clear()  # loaded here; Accelerate's own strict load would miss the frozen weights

    accelerator.register_save_state_pre_hook(keep_what_trains)
    accelerator.register_load_state_pre_hook(load_what_trains)


def merged(model):
    """The base model with the adapter folded into its weights (a plain transformers model). Changes `model`."""
    return model.merge_and_unload()
