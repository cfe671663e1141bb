"""What is trained: the tokenizer, the model and its optimizer.

    build_tokenizer(config)              --tokenizer_name, the model's own, or a byte-level one
    build_model(config, tokenizer, ...)  pretrained (--model_name_or_path), random init from a
                                         config (--config_name, default: the built-in GPT-2), or
                                         your own torch.nn.Module (--model_module)
    apply_training_switches(model, cfg)  --gradient_checkpointing, --use_lora (lora.py), --torch_compile
    build_optimizer(model, config)       AdamW over what trains, biases and norms not decayed
    loss_of(outputs)                     the loss from what a model's forward returned

Your own model (--model_module my_model.py): a Python file that defines

    def build_model(vocab_size: int, block_size: int) -> torch.nn.Module

whose forward takes the batch as keyword arguments (input_ids, labels) and returns the mean
loss, as a tensor or as an object with a `.loss` (what transformers models return). Its
checkpoints are the same files as any model's (model.safetensors, optimizer, ...); the final
model is model.safetensors plus a copy of the file, and `load_own_model(OUTPUT_DIR)` builds it
again. examples/tiny_transformer.py is one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

from cli import identity
from cli.config import TrainingConfig, UsageError

OWN_MODEL_SOURCE = "model_module.py"  # the copy of --model_module beside the final weights
OWN_MODEL_RECORD = "own_model.json"  # how to call its build_model again


def build_tokenizer(config: TrainingConfig):
    from transformers import AutoTokenizer, ByT5Tokenizer

    source = config.tokenizer_name or config.model_name_or_path
    if source is None:
        return ByT5Tokenizer()  # bytes in, bytes out: needs no vocabulary file and no download
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise UsageError(f"cannot load a tokenizer from {source}: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2-style tokenizers have none; classification pads
    return tokenizer


def build_model(config: TrainingConfig, tokenizer, label_names: list | None):
    """The model for --task: pretrained from --model_name_or_path, else random init from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = {}
    if config.task == "sequence-classification":
        # The user's own label names travel with the model, so predictions come back in their words.
        extra = {
            "num_labels": len(label_names), "id2label": {i: str(name) for i, name in enumerate(label_names)},
            "label2id": {str(name): i for i, name in enumerate(label_names)}, "pad_token_id": tokenizer.pad_token_id,
        }  # fmt: skip
    if config.model_module:
        module = import_model_module(config.model_module)
        return module.build_model(vocab_size=len(tokenizer), block_size=config.block_size)
    model_class = AutoModelForCausalLM if config.task == "causal-lm" else AutoModelForSequenceClassification
    try:
        if config.model_name_or_path:
            return model_class.from_pretrained(config.model_name_or_path, **extra)
        model_config = AutoConfig.from_pretrained(config.model_config_path, **extra)
    except OSError as error:
        raise UsageError(f"cannot load a model from {config.model_config_path}: {str(error).splitlines()[0]}") from None
    if getattr(model_config, "vocab_size", len(tokenizer)) < len(tokenizer):
        raise UsageError(f"--config_name: vocab_size {model_config.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    model = model_class.from_config(model_config)
    if config.task == "causal-lm" and getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, minus its warning at every start
    return model



def apply_training_switches(model, config: TrainingConfig):
    """--gradient_checkpointing, --use_lora, --torch_compile, in this order, on the built model.

    Returns (model, what a checkpoint records about them: under LoRA, the base model's fingerprint).
    """
    record = {}
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UsageError("--gradient_checkpointing needs a transformers model; in your --model_module, wrap blocks in torch.utils.checkpoint yourself")
        # Non-reentrant: works with frozen inputs (LoRA) and replays the RNG state, so dropout is unchanged.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.use_lora:
        from cli import lora

        record = lora.recorded_settings(config, lora.base_model_fingerprint(model))
        model = lora.add_adapters(model, config)
    if config.torch_compile:
        # Module.compile compiles in place: no OptimizedModule wrapper, so the state_dict (checkpoints,
        # the final model) has exactly the keys of an uncompiled run, with no `_orig_mod.` prefix.
        model.compile(mode=config.torch_compile_mode)
    return model, record


def build_optimizer(model, config: TrainingConfig):
    import torch

    # Biases and normalization weights are not decayed (the usual AdamW practice). Frozen weights
    # (the base under LoRA) are left out, so the optimizer's state is that of what trains.
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.ndim >= 2]
    not_decayed = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate)



def loss_of(outputs):
    """A transformers model returns an object with `.loss`; your own model may return the loss itself."""
    return outputs.loss if hasattr(outputs, "loss") else outputs


@functools.cache
def model_module_source(path: str) -> bytes:
    """The --model_module file as read once by this process: the code that is built, recorded and copied
    beside the final weights is the same even if the file is edited while the run trains."""
    return Path(path).read_bytes()


def import_model_module(path: str):
    """The --model_module file as a module; UsageError if it cannot be imported or has no build_model."""
    spec = importlib.util.spec_from_file_location("resumable_model_module", path)
    module = importlib.util.module_from_spec(spec)
    try:
        exec(compile(model_module_source(path), path, "exec"), module.__dict__)  # what spec.loader.exec_module does, from the bytes read once
    except Exception as error:  # a user's file: any error in it is a bad input, shown in one line
        raise UsageError(f"--model_module {path}: importing it failed: {type(error).__name__}: {error}") from None
    if not callable(getattr(module, "build_model", None)):
        raise UsageError(f"--model_module {path}: define build_model(vocab_size, block_size) returning a torch.nn.Module")
    return module


def model_identity(config: TrainingConfig) -> str:
    """What the checkpoint records of the model's definition, to refuse a resume with another one."""
    if config.model_module:
        return "model_module sha256 " + hashlib.sha256(model_module_source(config.model_module)).hexdigest()
    return identity.model_config_text(config.model_config_path)  # a file's or a directory's config.json text


def own_model_files(config: TrainingConfig) -> dict[str, str]:
    """Files written beside the final weights of a --model_module model, so it can be built again."""
    if not config.model_module:
        return {}
    record = {"module": OWN_MODEL_SOURCE, "build_model": {"block_size": config.block_size}}
    return {OWN_MODEL_SOURCE: model_module_source(config.model_module).decode("utf-8"), OWN_MODEL_RECORD: json.dumps(record, indent=2) + "\n"}


def load_own_model(output_dir: str | Path):
    """The final model of a --model_module run, weights loaded (a torch.nn.Module, in eval mode)."""
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    output_dir = Path(output_dir)
    record = json.loads((output_dir / OWN_MODEL_RECORD).read_text())
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    module = import_model_module(str(output_dir / record["module"]))
    model = module.build_model(vocab_size=len(tokenizer), **record["build_model"])
    load_model(model, str(output_dir / "model.safetensors"))
    return model.eval()
