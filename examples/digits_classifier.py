"""Handwritten digits with a small CNN, in an ordinary Accelerate loop made interruption-proof by `resumable`.

    python examples/digits_classifier.py --output_dir out [--max_steps N] [--save_steps N]
    accelerate launch --multi_gpu --num_processes 2 examples/digits_classifier.py --output_dir out   (2 CPU ranks too)
    ... --stream     the digits as a stream: each rank reads its own part, and each checkpoint holds where it stands

Kill it any way you like and run the same command again: training continues at the exact batch,
and the final out/model.safetensors is byte for byte the one of a run that was never stopped (CPU).
Exit codes: 0 complete, 75 stopped early with a checkpoint (run again), 2 bad input.

The data is scikit-learn's bundled copy of the UCI handwritten digits (1,797 8x8 images, no
download). The lines marked `# resumable` are all that the library adds to the loop.
"""

from __future__ import annotations

import argparse
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

import resumable  # resumable


class Digits(torch.utils.data.Dataset):
    """The user's own Dataset: (1 x 8 x 8 image scaled to [0, 1], class) pairs."""

    def __init__(self, images, labels):
        self.images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


class DigitsStream(torch.utils.data.IterableDataset):
    """This rank's part of the digits as a stream that remembers its position (state_dict/load_state_dict), as run.batches needs.

    Each epoch is a shuffle drawn from (seed, epoch); rank r of W takes every W-th example of it, so the
    ranks read disjoint parts. state_dict() is the position after the last example yielded.
    """

    def __init__(self, digits: Digits, seed: int, rank: int, world_size: int):
        self.digits, self.seed, self.rank, self.world_size = digits, seed, rank, world_size
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int):  # resumable.Run calls it before each epoch
        self.epoch, self.position = epoch, 0

    def __iter__(self):
        order = torch.randperm(len(self.digits), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank :: self.world_size]
        while self.position < len(mine):
            index = mine[self.position]
            self.position += 1  # before the yield: while the consumer holds this example, the position is already past it
            yield self.digits[index]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


def small_cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Dropout(0.25),  # dropout: the RNG state is part of what a resume restores
        torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=3000)
    parser.add_argument("--save_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_steps", type=int, default=0, help="measure the validation accuracy every N steps and keep the best checkpoint")
    parser.add_argument("--max_time", default=None, help="stop with a checkpoint before this much time: 5400, 90m, 1h30m")
    parser.add_argument("--backup_to", default=None, help="also keep checkpoints in this folder or s3://bucket/prefix (pip install obstore)")
    parser.add_argument("--async_save", action="store_true", help="write checkpoints in the background while training goes on")
    parser.add_argument("--stream", action="store_true", help="read the digits as a per-rank stream (an IterableDataset with state_dict)")
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    set_seed(args.seed)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # with no GPU, this makes several processes real gloo ranks
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),  # each epoch's order from (seed, epoch)
        gradient_accumulation_steps=args.gradient_accumulation_steps,  # resumed on another number of processes, resumable changes it
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, on any number of processes
    )
    images, labels = load_digits(return_X_y=True)
    train, validation = Digits(images[:1500], labels[:1500]), Digits(images[1500:], labels[1500:])
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / args.max_steps))
    if args.stream:  # not prepared: each rank reads its own part, and num_workers=0 reads no batch ahead of the training
        stream = DigitsStream(train, args.seed, accelerator.process_index, accelerator.num_processes)
        train_loader = torch.utils.data.DataLoader(stream, batch_size=args.per_device_train_batch_size, drop_last=True, num_workers=0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:
        train_loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    settings = {name: value for name, value in vars(args).items() if name in ("max_steps", "learning_rate", "per_device_train_batch_size", "seed")}  # resumable

    def evaluate() -> dict:  # every eval_steps steps, on every rank, before that step's saves
        measured = accuracy(accelerator.unwrap_model(model), validation)
        model.train()
        return {"accuracy": measured}

    evaluation = dict(evaluate=evaluate, eval_steps=args.eval_steps, best_metric="accuracy") if args.eval_steps else {}
    run = resumable.Run(accelerator, args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps, settings=settings,  # resumable
                        max_time=args.max_time, backup_to=args.backup_to, async_save=args.async_save, **evaluation)  # resumable
    run.start()  # resumable

    model.train()
    for images, labels in run.batches(train_loader):  # resumable: the batches still to train
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)  # a stream's batches are not moved by prepare
        with accelerator.accumulate(model):  # with accumulation K: no all-reduce and no optimizer step until the K-th micro-batch
            logits = model(images)
            loss = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).mean()  # cross-entropy, written out
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # an optimizer step was taken
            scheduler.step()
            run.step(loss=loss)  # resumable: count, log, save, stop when asked

    code = run.finish(model)  # resumable: 0 complete, 75 stopped early
    if code == resumable.EXIT_DONE:
        accelerator.print(f"Validation accuracy: {accuracy(accelerator.unwrap_model(model), validation):.3f} on {len(validation)} images")
    return code


@torch.no_grad()
def accuracy(model, dataset) -> float:
    model.eval()
    device = next(model.parameters()).device
    predictions = model(dataset.images.to(device)).argmax(dim=-1)
    return (predictions == dataset.labels.to(device)).float().mean().item()


if __name__ == "__main__":
    sys.exit(main())
