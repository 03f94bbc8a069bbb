"""Training losses: cross-entropy on the answer tokens and the attention loss, which
teaches chosen injection heads to look at the evidence an answer copies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model import AttentionTap, SharedLLM

if TYPE_CHECKING:
    from .train import TrainConfig


@dataclass
class AttentionTarget:
    """Where the injection should look: tree `entries` for input `rows`, taught to the
    listed heads of each injection layer that runs (in layer order; None: not taught)."""

    rows: mx.array
    entries: mx.array
    heads: list[list[int] | None]


def example_loss(
    model: SharedLLM, inputs, targets, mask, tree, attention: AttentionTarget | None = None
) -> tuple[mx.array, mx.array]:
    """(summed cross-entropy over the masked targets, summed negative log attention of
    the taught heads on their entries, per head). The tree is a constant here."""
    tap = AttentionTap(attention.rows) if attention is not None else None
    h = model.hidden_states(inputs[None], tree, tap=tap)[0]
    # Only scored positions need logits: a response is a few tokens of a long window.
    keep = np.flatnonzero(np.asarray(mask))
    if len(keep) < len(mask):
        rows = mx.array(keep)
        h, targets, mask = h[rows], targets[rows], mask[rows]
    logits = model.head(h).astype(mx.float32)
    loss = (nn.losses.cross_entropy(logits, targets) * mask).sum()
    if tap is None:
        return loss, mx.array(0.0)
    return loss, attention_nll(tap.logprobs, attention)


def attention_nll(logprobs: list[mx.array], target: AttentionTarget) -> mx.array:
    """Minus the log attention on the target entries, summed over rows, mean over heads."""
    total, heads_taught = mx.array(0.0), 0
    index = target.entries[None, :, None]
    for layer_logprobs, heads in zip(logprobs, target.heads):
        if heads:
            picked = layer_logprobs[0][mx.array(heads)]
            on = mx.take_along_axis(
                picked, mx.broadcast_to(index, (len(heads), *index.shape[1:])), -1
            )
            total, heads_taught = total - on.sum(), heads_taught + len(heads)
    return total / max(heads_taught, 1)


def taught_heads(model: SharedLLM, config: TrainConfig) -> list[list[int] | None]:
    """Per injection layer that runs while training (in order), the heads to teach."""
    injecting, n_heads = model.config.injection_layers, model.args.num_attention_heads
    training = config.injection_layers or injecting
    pairs = config.attention_heads or [(i, h) for i in training for h in range(n_heads)]
    wrong = [f"{i}.{h}" for i, h in pairs if i not in training or not 0 <= h < n_heads]
    if wrong:
        raise ValueError(f"attention heads {wrong} are not heads of a training injection layer")
    return [sorted(h for i, h in pairs if i == layer) or None for layer in injecting]
