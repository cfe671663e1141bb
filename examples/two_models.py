"""Two models, two optimizers and an EMA in one loop: online distillation on handwritten digits, interruption-proof.

    python examples/two_models.py --output_dir out [--max_steps N] [--save_steps N]
    accelerate launch --multi_gpu --num_processes 2 examples/two_models.py --output_dir out   (2 CPU ranks too)

A teacher MLP learns scikit-learn's bundled digits (no download) from their labels while a small
student learns from the teacher's softened predictions alone, and an EMA of the student's weights is
kept: two models, two optimizers and extra state, which the CLI cannot express. Kill it any way you
like and run the same command again: the final out/model.safetensors (teacher.*, student.*,
student_ema.*) is byte for byte the one of a run that was never stopped (CPU).
Exit codes: 0 complete, 75 stopped early with a checkpoint (run again), 2 bad input.
"""

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from sklearn.datasets import load_digits

import resumable  # resumable


def digits(images, labels) -> torch.utils.data.TensorDataset:  # map-style: (64 pixels scaled to [0, 1], class)
    return torch.utils.data.TensorDataset(torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(labels, dtype=torch.long))


def mlp(width: int, dropout: float) -> torch.nn.Module:
    # Dropout draws from the RNG each step: a resume must restore it to repeat the same masks.
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(width, 10))


class EMA:
    """A moving average of a model's weights: no optimizer of its own, so run.register checkpoints it (tensors)."""

    def __init__(self, model: torch.nn.Module, decay: float, device: torch.device):
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).to(device)  # the averaged weights, beside the model's

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current, 1.0 - self.decay)  # decay * average + (1 - decay) * current

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=800)
    parser.add_argument("--save_steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ema_decay", type=float, default=0.99)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async_save", action="store_true", help="write checkpoints in the background while training goes on")
    args = parser.parse_args()

    set_seed(args.seed)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # with no GPU, this makes several processes real gloo ranks
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),  # each epoch's order from (seed, epoch)
    )
    images, labels = load_digits(return_X_y=True)
    train, validation = digits(images[:1500], labels[:1500]), digits(images[1500:], labels[1500:])
    teacher, student = mlp(256, dropout=0.3), mlp(32, dropout=0.1)
    ema = EMA(student, args.ema_decay, accelerator.device)  # copied before prepare: plain weights, never a DDP wrapper
    teacher_optimizer = torch.optim.AdamW(teacher.parameters(), lr=args.learning_rate)
    student_optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate)
    train_loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True)
    teacher, student, teacher_optimizer, student_optimizer, train_loader = accelerator.prepare(
        teacher, student, teacher_optimizer, student_optimizer, train_loader
    )

    settings = {name: value for name, value in vars(args).items() if name not in ("output_dir", "save_steps", "async_save")}  # resumable
    run = resumable.Run(accelerator, args.output_dir, max_steps=args.max_steps, save_steps=args.save_steps, settings=settings, async_save=args.async_save)  # resumable
    run.register(ema=ema)  # resumable: checkpointed with the models and optimizers, restored on resume
    run.start()  # resumable

    teacher.train(), student.train()
    temperature = args.temperature  # softens both distributions, so the student also learns the teacher's near misses
    for images, labels in run.batches(train_loader):  # resumable: the batches still to train
        teacher_logits = teacher(images)
        teacher_loss = F.cross_entropy(teacher_logits, labels)
        # The student never sees a label. Detached: the teacher does not learn from the student. T^2 keeps the gradients' scale.
        soft_targets = F.softmax(teacher_logits.detach() / temperature, dim=-1)
        student_log_probs = F.log_softmax(student(images) / temperature, dim=-1)
        student_loss = F.kl_div(student_log_probs, soft_targets, reduction="batchmean") * temperature**2
        accelerator.backward(teacher_loss + student_loss)  # one backward: the two losses share no weights
        for optimizer in (teacher_optimizer, student_optimizer):
            optimizer.step()
            optimizer.zero_grad()
        ema.update(student)  # after the step, so the average follows the weights just trained
        run.step(teacher_loss=teacher_loss, student_loss=student_loss)  # resumable: count, log, save, stop when asked

    trained = {"teacher": teacher, "student": student, "student_ema": ema.model}  # one file, keys prefixed: teacher.*, student.*, ...
    code = run.finish(trained)  # resumable: 0 complete, 75 stopped early
    if code == resumable.EXIT_DONE:
        scores = ", ".join(f"{name} {accuracy(accelerator.unwrap_model(model), validation):.3f}" for name, model in trained.items())
        accelerator.print(f"Validation accuracy on {len(validation)} images: {scores}")
    return code


@torch.no_grad()
def accuracy(model, dataset) -> float:
    model.eval()
    images, labels = (tensor.to(next(model.parameters()).device) for tensor in dataset.tensors)
    return (model(images).argmax(dim=-1) == labels).float().mean().item()


if __name__ == "__main__":
    sys.exit(main())
