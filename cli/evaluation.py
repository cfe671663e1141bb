"""Evaluation over the validation set, and which result counts as the best."""

from __future__ import annotations

import math

from resumable import state
from cli.model import loss_of


def evaluate(accelerator, model, eval_dataloader, task: str) -> dict:
    """Evaluation loss (and perplexity or accuracy) over the whole validation set, all ranks.

    The global RNG is left exactly as it was: starting a DataLoader draws from it, and
    training after an evaluation must not depend on whether a resume re-ran it.
    """
    import torch

    rng_before = state.capture_rng_state()
    model.eval()
    loss_sum, examples, correct = 0.0, 0, 0
    for batch in eval_dataloader:
        with torch.no_grad():
            outputs = model(**batch)
        size = batch["labels"].shape[0]
        # gather_for_metrics drops the samples repeated to give every rank the same batch count.
        losses = accelerator.gather_for_metrics(loss_of(outputs).detach().float().repeat(size))
        loss_sum += losses.sum().item()
        examples += losses.numel()
        if task == "sequence-classification":
            predictions, labels = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
            correct += (predictions == labels).sum().item()
    model.train()
    state.restore_rng_state(rng_before)
    metrics = {"eval_loss": round(loss_sum / examples, 6)}
    if task == "causal-lm":
        metrics["eval_perplexity"] = round(math.exp(min(metrics["eval_loss"], 50.0)), 4)
    else:
        metrics["eval_accuracy"] = round(correct / examples, 6)
    return metrics



def is_better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)
