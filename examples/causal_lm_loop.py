"""A transformers causal language model in a plain loop with gradient accumulation, interruption-proof.

    python examples/causal_lm_loop.py --output_dir out [--train_file PATH] [--max_steps N] [--save_steps N]
    accelerate launch --multi_gpu --num_processes 2 examples/causal_lm_loop.py --output_dir out   (2 CPU ranks too)

A 2-layer GPT-2 built from a config (nothing downloaded) learns to continue a text file byte by
byte: the file's bytes are the token ids (vocabulary 256, no tokenizer), cut into blocks of 32.
The default file is the Python standard library's os.py, present wherever Python is. Each
optimizer step accumulates the gradients of 2 micro-batches; `resumable` counts optimizer steps,
so checkpoint-N holds the state after N of them, whatever the accumulation. Kill it any way you
like and run the same command again: the final out/model.safetensors is byte for byte the one of
a run that was never stopped (CPU).
Exit codes: 0 complete, 75 stopped early with a checkpoint (run again), 2 bad input.
"""

import argparse
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import AutoModelForCausalLM, GPT2Config

import resumable  # resumable


def byte_blocks(path: str, block_size: int) -> torch.Tensor:
    """The file's bytes as token ids, in whole blocks of `block_size` (the tail that fills no block is dropped)."""
    with open(path, "rb") as file:
        tokens = torch.tensor(list(file.read()), dtype=torch.long)
    return tokens[: len(tokens) // block_size * block_size].reshape(-1, block_size)


class Blocks(torch.utils.data.Dataset):
    """A map-style Dataset of token blocks: any block can be fetched by index, so a resume can skip to one."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return self.blocks[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_file", default=os.__file__)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--save_steps", type=int, default=25)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    set_seed(args.seed)  # before the model is built: its initial weights come from this seed
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # with no GPU, this makes several processes real gloo ranks
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),  # each epoch's order from (seed, epoch)
        gradient_accumulation_steps=args.gradient_accumulation_steps,  # accelerator.accumulate() syncs every K-th micro-batch
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, on any number of processes
    )
    blocks = byte_blocks(args.train_file, args.block_size)
    held_out = len(blocks) // 10  # the file's last tenth is kept out of training, to measure the result on
    train, validation = Blocks(blocks[:-held_out]), Blocks(blocks[-held_out:])
    # GPT-2's dropout (0.1 by default) draws from the RNG each step: a resume must restore it to repeat the same masks.
    # Bytes have no special tokens. The output layer is not tied to the embedding: no shared tensor in the checkpoints.
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=2 * args.block_size,
                        bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    # Linear decay to 0 at max_steps, stepped once per optimizer step (below).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.max_steps))
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    settings = {name: value for name, value in vars(args).items() if name not in ("output_dir", "save_steps")}  # resumable
    run = resumable.Run(accelerator, args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps, settings=settings)  # resumable
    run.start()  # resumable

    model.train()
    for input_ids in run.batches(train_loader):  # resumable: micro-batches, gradient_accumulation_steps per optimizer step
        with accelerator.accumulate(model):  # no gradient all-reduce, and no optimizer step, until the K-th micro-batch
            loss = model(input_ids=input_ids, labels=input_ids).loss  # the model shifts the labels: each byte predicts the next
            accelerator.backward(loss)  # divides the loss by K, so K micro-batches add up to one batch's mean
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # the K-th micro-batch: an optimizer step was taken
            scheduler.step()  # here, not at every micro-batch: the scheduler is not tied to the optimizer (step_scheduler_with_optimizer=False)
            run.step(loss=loss)  # resumable: count, log, save, stop when asked

    code = run.finish(model)  # resumable: 0 complete, 75 stopped early
    if code == resumable.EXIT_DONE:
        loss = held_out_loss(accelerator.unwrap_model(model), validation)
        accelerator.print(f"Held-out loss: {loss:.3f} nats per byte on the file's last {len(validation)} blocks")
    return code


@torch.no_grad()
def held_out_loss(model, dataset) -> float:
    model.eval()
    blocks = dataset.blocks.to(model.device)
    return model(input_ids=blocks, labels=blocks).loss.item()


if __name__ == "__main__":
    sys.exit(main())
