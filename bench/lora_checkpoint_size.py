"""Benchmark: the bytes of a LoRA checkpoint against the full checkpoint of the same run.

    .venv/bin/python bench/lora_checkpoint_size.py [--lora_r 8] [--steps 2]

Two models: the built-in one (random init from --config_name, default configs/gpt2-small-byte.json)
and a local pretrained model directory (a GPT-2 of --pretrained_config's shape, default GPT-2 small's
12 layers x 768 with the byte vocabulary, written with save_pretrained as a user's fine-tuning base).
For each, train_loop.py trains --steps steps twice with the same flags: once in full, once with
--use_lora --lora_r R (peft's default targets: c_attn). The size is that of the whole checkpoint
directory (weights, optimizer, scheduler, RNG, trainer state, flags, manifest). Prints one table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from restart_preprocessing import write_corpus

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resumable.state import directory_size  # noqa: E402

GPT2_SMALL_BYTE = {"model_type": "gpt2", "vocab_size": 384, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}  # fmt: skip


def checkpoint_bytes(flags: list[str], output_dir: Path, env: dict, steps: int) -> int:
    command = [sys.executable, str(REPO / "train_loop.py"), "--output_dir", str(output_dir), *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return directory_size(output_dir / f"checkpoint-{steps}")


def trainable_share(model_flags: list[str], lora_r: int) -> tuple[int, int]:
    """(all parameters, parameters that train under LoRA), counted on the model train_loop.py builds."""
    from cli.config import parse_config
    from cli.model import apply_training_switches, build_model, build_tokenizer

    config = parse_config([*model_flags, "--use_lora", "--lora_r", str(lora_r)])
    model, _ = apply_training_switches(build_model(config, build_tokenizer(config), None), config)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config_name", default=str(REPO / "configs" / "gpt2-small-byte.json"), help="the built-in model's config")
    parser.add_argument("--pretrained_config", default=None, help="a GPT-2 config .json for the local pretrained directory (default: GPT-2 small's shape)")
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, 2000)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}

        from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

        pretrained = scratch / "my-gpt2"
        shape = json.loads(Path(args.pretrained_config).read_text()) if args.pretrained_config else GPT2_SMALL_BYTE
        GPT2LMHeadModel(GPT2Config(**{k: v for k, v in shape.items() if k != "model_type"})).save_pretrained(pretrained)
        ByT5Tokenizer().save_pretrained(pretrained)

        models = {
            f"built-in ({Path(args.config_name).name}, random init)": ["--config_name", args.config_name],
            f"local pretrained directory ({shape['n_layer']} x {shape['n_embd']}, save_pretrained)": ["--model_name_or_path", str(pretrained)],
        }
        common = ["--train_file", str(corpus), "--block_size", str(args.block_size), "--per_device_train_batch_size", "2",
                  "--max_steps", str(args.steps), "--save_steps", str(args.steps), "--logging_steps", "1"]  # fmt: skip
        print(f"--lora_r {args.lora_r}, {args.steps} steps, checkpoint-{args.steps}/ measured (every file in it)\n")
        print("| model | parameters | trained with LoRA | full checkpoint (bytes) | LoRA checkpoint (bytes) | LoRA / full |")
        print("|---|---|---|---|---|---|")
        for index, (name, model_flags) in enumerate(models.items()):
            full = checkpoint_bytes([*model_flags, *common], scratch / f"full-{index}", env, args.steps)
            lora = checkpoint_bytes([*model_flags, *common, "--use_lora", "--lora_r", str(args.lora_r)], scratch / f"lora-{index}", env, args.steps)
            total, trained = trainable_share([*model_flags, *common], args.lora_r)
            print(f"| {name} | {total:,} | {trained:,} ({trained / total:.2%}) | {full:,} | {lora:,} | {lora / full:.2%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
