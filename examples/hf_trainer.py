"""A transformers.Trainer script in the usual shape, interruption-proof with two added lines (marked `# resumable`).

    python examples/hf_trainer.py --output_dir out [--train_file PATH] [--max_steps N] [--save_steps N]
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py --output_dir out   (2 CPU ranks too)

A 2-layer GPT-2 built from a config (nothing downloaded) learns to continue a text file byte by
byte: the file's bytes are the token ids (vocabulary 256, no tokenizer), in blocks of 32. The
default file is the Python standard library's os.py, present wherever Python is.

Kill it any way you like and run the same command again. With the two lines, each checkpoint is
verified before a resume trusts it, a signal or a time limit saves the current step and exits 75,
and out/model.safetensors at the end is that of a run that was never stopped (CPU).
--plain runs the same script without the two lines, as the usual guide writes it
(`trainer.train(resume_from_checkpoint=get_last_checkpoint(output_dir))`), for comparison.
Exit codes: 0 complete, 75 stopped early with a checkpoint (run again), 2 bad input.
"""

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from resumable.trainer import ResumableCallback, checkpoint_to_resume  # resumable


class Blocks(torch.utils.data.Dataset):
    """The file's bytes as token ids, in whole blocks; each item is what a causal LM takes (the model shifts the labels)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def byte_blocks(path: str, block_size: int) -> torch.Tensor:
    with open(path, "rb") as file:
        tokens = torch.tensor(list(file.read()), dtype=torch.long)
    return tokens[: len(tokens) // block_size * block_size].reshape(-1, block_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_file", default=os.__file__)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--save_steps", type=int, default=25)
    parser.add_argument("--save_total_limit", type=int, default=2)
    parser.add_argument("--max_time", default=None, help="stop with a checkpoint before this much time (e.g. 3h50m); a SLURM job's end counts too")
    parser.add_argument("--backup_to", default=None, help="also copy each checkpoint to this folder or s3://bucket/prefix")
    parser.add_argument("--plain", action="store_true", help="without the two resumable lines, for comparison")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    blocks = byte_blocks(options.train_file, 32)
    held_out = len(blocks) // 10  # the file's last tenth is kept out of training, to measure the result on
    train, validation = Blocks(blocks[:-held_out]), blocks[-held_out:]
    args = TrainingArguments(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=10,
        seed=options.seed,
        use_cpu=not torch.cuda.is_available(),  # with no GPU, several processes are gloo ranks
        report_to="none",
        disable_tqdm=True,
    )
    # The model is built after TrainingArguments, from the seed: its initial weights are the same in every run.
    torch.manual_seed(options.seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=64, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)

    if options.plain:
        trainer = Trainer(model=model, args=args, train_dataset=train)
        trainer.train(resume_from_checkpoint=get_last_checkpoint(options.output_dir) if os.path.isdir(options.output_dir) else None)
    else:
        resumable = ResumableCallback(max_time=options.max_time, backup_to=options.backup_to)  # resumable: signals are caught from here on
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[resumable])
        trainer.train(resume_from_checkpoint=checkpoint_to_resume(trainer))  # resumable: a stopped run exits 75 in here

    trainer.save_model()  # OUTPUT_DIR/model.safetensors: reached only when training is complete
    if trainer.is_world_process_zero():
        print(f"Held-out loss: {held_out_loss(trainer.model, validation):.3f} nats per byte", flush=True)
    return 0


@torch.no_grad()
def held_out_loss(model, blocks) -> float:
    model.eval()
    blocks = blocks.to(model.device)
    return model(input_ids=blocks, labels=blocks).loss.item()


if __name__ == "__main__":
    sys.exit(main())
