"""Your own model, in plain PyTorch: a small causal transformer for ./launch.sh --model_module.

    ./launch.sh --model_module examples/tiny_transformer.py --train_file my.txt --output_dir run

The contract with train_loop.py (model.py's docstring has it whole):
  - `build_model(vocab_size, block_size)` returns a torch.nn.Module;
  - its forward takes the batch as keyword arguments (input_ids, labels) and returns the mean
    loss (a scalar tensor), which the loop backpropagates.
Everything else (checkpoints, exact resume, the final model.safetensors) is the loop's job.
Load the trained model again with `cli.model.load_own_model(OUTPUT_DIR)`.
"""

import torch
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, width: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(block_size, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)  # not tied to the embedding: plain safetensors

    def forward(self, input_ids, labels=None, **unused):
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device)
        logits = self.head(self.norm(self.blocks(hidden, mask=causal, is_causal=True)))
        if labels is None:
            return logits
        # Each position predicts the next token.
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def build_model(vocab_size: int, block_size: int) -> nn.Module:
    return TinyTransformer(vocab_size, block_size)
