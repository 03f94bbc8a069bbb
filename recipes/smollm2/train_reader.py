"""Train a LoRA on the reader: the upper layers that only the answer runs through.

    python recipes/smollm2/train_reader.py --out runs/reader --steps 200
    python recipes/smollm2/train_reader.py --out runs/reader --steps 400 --resume

Stacked from one, the compressor is the model's first M layers; layers M and above read
only the prompt and the re-read passages, so a LoRA there changes the answers and never
the tree nor the passages re-reading picks. Examples are re-read messages
(`reader_data.py`), in the chat template generate uses, with the loss on the answer's
tokens and its end-of-turn token. Each save writes `reader_lora.safetensors` (the LoRA
factors by parameter name) and `reader.json` (rank, scale, layers, step, losses), and a
held-out loss on examples of another seed goes into `log.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from reader_data import filler_sentences, reader_example  # noqa: E402
from sources import training_texts  # noqa: E402

from mlx_sharedllm.adapters import add_lora  # noqa: E402
from mlx_sharedllm.default import default_model  # noqa: E402
from mlx_sharedllm.generate import REREAD_MESSAGE, encode_prompt  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402

FILLER_BOOKS = ("alice", "sherlock-holmes")
HELD_OUT = 32  # examples of seed 1, for the held-out loss


def encode(tokenizer, example) -> tuple[list[int], int]:
    """(prompt and answer ids, where the answer starts)."""
    passages = "\n".join(f"{i}. {line}" for i, line in enumerate(example.lines, 1))
    message = REREAD_MESSAGE.format(passages=passages, prompt=example.question)
    prompt = encode_prompt(tokenizer, message).tolist()
    answer = tokenizer.encode(example.answer, add_special_tokens=False)
    return prompt + answer + [tokenizer.eos_token_id], len(prompt)


def batch(tokenizer, examples) -> tuple[mx.array, mx.array, mx.array]:
    """(inputs padded to the longest example, flat indices of the answer's positions,
    the tokens those positions must predict)."""
    encoded = [encode(tokenizer, e) for e in examples]
    width = max(len(ids) for ids, _ in encoded) - 1
    inputs = np.zeros((len(encoded), width), np.int32)
    where, targets = [], []
    for row, (ids, start) in enumerate(encoded):
        inputs[row, : len(ids) - 1] = ids[:-1]
        where += [row * width + i for i in range(start - 1, len(ids) - 1)]
        targets += ids[start:]
    return mx.array(inputs), mx.array(np.array(where)), mx.array(np.array(targets))


def loss_fn(model, inputs, where, targets) -> mx.array:
    """Mean cross-entropy of the answers' tokens (the head runs on those positions only)."""
    h = model.hidden_states(inputs)
    logits = model.head(h.reshape(-1, h.shape[-1])[where]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets).mean()


def save(out: Path, model, meta: dict) -> None:
    """The LoRA factors and what made them (train_reader's `reader.json`)."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out / "reader_lora.safetensors"), weights)
    (out / "reader.json").write_text(json.dumps(meta) + "\n")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument("--linears", default=None, help="comma-separated (default: every linear)")
    p.add_argument("--list-share", type=float, default=0.25, help="share of list questions")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="from the last save (Adam restarts)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(default_model())
    model.freeze()
    layers = tuple(range(model.config.num_injection_layers, len(model.layers)))
    linears = {"linears": tuple(a.linears.split(","))} if a.linears else {}
    add_lora(model, layers, a.rank, a.scale, **linears)
    meta = {"rank": a.rank, "scale": a.scale, "layers": list(layers), **linears, "step": 0}
    if a.resume and (out / "reader.json").exists():
        model.load_weights(str(out / "reader_lora.safetensors"), strict=False)
        meta["step"] = json.loads((out / "reader.json").read_text())["step"]
    texts = training_texts()
    filler = [s for book in FILLER_BOOKS for s in filler_sentences(texts[book])]
    held = [reader_example(np.random.default_rng([1, i]), filler) for i in range(HELD_OUT)]
    optimizer, value_and_grad = optim.Adam(learning_rate=a.lr), nn.value_and_grad(model, loss_fn)
    tic = time.perf_counter()
    with open(out / "log.jsonl", "a") as log:
        while meta["step"] < a.steps:
            rng = np.random.default_rng([a.seed, meta["step"]])
            examples = [reader_example(rng, filler, a.list_share) for _ in range(a.batch)]
            loss, grads = value_and_grad(model, *batch(tokenizer, examples))
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, loss)
            meta["step"] += 1
            row = {"step": meta["step"], "loss": round(loss.item(), 4)}
            if meta["step"] % a.save_every == 0 or meta["step"] == a.steps:
                losses = [loss_fn(model, *batch(tokenizer, held[i : i + 8])).item()
                          for i in range(0, HELD_OUT, 8)]  # fmt: skip
                row["held_loss"] = round(float(np.mean(losses)), 4)
                save(out, model, meta)
            row["s"] = round(time.perf_counter() - tic, 1)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(row, flush=True)


if __name__ == "__main__":
    main()
