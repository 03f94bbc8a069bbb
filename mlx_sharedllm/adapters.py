"""Adapters: the trained weights alone, loaded onto their base model or fused into it.

An adapter is a folder with `adapter.safetensors` (the trained parameters, by name)
and `adapter.json` (which parameters, and the fingerprint of the base model they were
trained from, so an adapter is never applied to another model).

It may also hold LoRA factors for the linear layers of the upper model's top layers
(`<linear>.lora_a`, `<linear>.lora_b`, mlx-lm's LoRALinear layout, with `lora_scale` in
adapter.json): loading adds `lora_scale * (lora_a @ lora_b)` to that linear's weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from .cache import FLOAT_DTYPES, all_finite
from .io import copy_side_files, save_model_folder, write_atomically
from .model import SharedLLM
from .settings import IN_ADAPTERS, Settings, keys

ADAPTER_FORMAT = "mlx-sharedllm-adapter/1"
ADAPTER_WEIGHTS, ADAPTER_JSON = "adapter.safetensors", "adapter.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_JSON)
# What can train: the injection blocks, the upper model's top N-M layers, the output head.
GROUPS = ("injection", "upper", "head")
# The linear layers of a decoder layer that a LoRA adapts.
LORA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip
LORA_FACTORS = (".lora_a", ".lora_b")


def trainable_modules(
    model: SharedLLM, groups: tuple[str, ...], injection_layers: tuple[int, ...] | None = None
) -> list[nn.Module]:
    """The modules the named groups train; the lower model is never among them.

    `injection_layers` limits the injection group to those layers (default: all of the
    model's injection layers).
    """
    m, layers, valid = (
        model.config.num_injection_layers,
        model.layers,
        model.config.injection_layers,
    )
    modules: list[nn.Module] = []
    chosen = valid if injection_layers is None else injection_layers
    bad = [i for i in chosen if i not in valid]
    if bad:
        raise ValueError(f"injection layers {bad} are not among this model's {_layers(valid)}")
    if "injection" in groups:
        modules += [layers[i].cross_attn for i in chosen]
    if "upper" in groups:
        modules += layers[m:]
    if "head" in groups:
        if model.config.upper.tie_word_embeddings:
            raise ValueError(
                "this model ties its output head to the embedding: 'head' cannot train"
            )
        modules.append(model.lm_head)
    return modules


def _layers(layers: tuple[int, ...]) -> str:
    """'0..3' for a run of layers from 0, else the list."""
    return f"0..{layers[-1]}" if layers == tuple(range(len(layers))) else str(list(layers))


def set_trainable(
    model: SharedLLM, groups: tuple[str, ...], injection_layers: tuple[int, ...] | None = None
) -> None:
    """Freeze the whole model, then unfreeze the named groups."""
    model.freeze()
    for module in trainable_modules(model, groups, injection_layers):
        module.unfreeze()
    if not tree_flatten(model.trainable_parameters()):
        raise ValueError(f"{groups} name no parameters of this model")


def trainable_names(model: SharedLLM) -> set[str]:
    """Every parameter that some training run can write (any of GROUPS): an adapter
    holds only these."""
    groups = GROUPS if not model.config.upper.tie_word_embeddings else GROUPS[:2]
    chosen = {id(module) for module in trainable_modules(model, groups)}
    return {
        f"{path}.{name}"
        for path, module in model.named_modules()
        if id(module) in chosen
        for name, _ in tree_flatten(module.parameters())
    }


def add_lora(
    model: SharedLLM,
    layers: tuple[int, ...],
    rank: int,
    scale: float,
    linears: tuple[str, ...] = LORA_LINEARS,
) -> None:
    """Wrap the named linears (default: all) of the given upper layers in a trainable LoRA
    (mlx-lm's LoRALinear; the wrapped weights stay frozen). Only layers at or above the
    injection layers qualify: the compressor below them must not change."""
    m, n = model.config.num_injection_layers, len(model.layers)
    bad = [i for i in layers if not m <= i < n]
    if bad:
        raise ValueError(f"a LoRA adapts only the upper layers {m}..{n - 1}, not {bad}")
    unknown = sorted(set(linears) - set(LORA_LINEARS))
    if unknown:
        raise ValueError(f"{unknown} are not among the linears a LoRA adapts: {LORA_LINEARS}")
    for i in layers:
        for path in linears:
            parent_name, name = path.split(".")
            parent = getattr(model.layers[i], parent_name)
            lora = LoRALinear.from_base(getattr(parent, name), r=rank, scale=scale)
            lora.linear.freeze()
            setattr(parent, name, lora)


def fuse_lora(
    params: dict[str, mx.array], weights: dict[str, mx.array], scale: float
) -> dict[str, mx.array]:
    """The adapter's weights with each pair of LoRA factors replaced by the weight of the
    linear it adapts, fused (that linear's weight in `params` plus the LoRA's delta)."""
    fused = {k: v for k, v in weights.items() if not k.endswith(LORA_FACTORS)}
    linears = {k[: -len(".lora_a")] for k in weights if k.endswith(LORA_FACTORS)}
    for linear in sorted(linears):
        a, b = weights.get(f"{linear}.lora_a"), weights.get(f"{linear}.lora_b")
        if a is None or b is None:
            raise ValueError(f"{linear} has one LoRA factor without the other")
        weight = params.get(f"{linear}.weight")
        if weight is None or not linear.endswith(LORA_LINEARS):
            raise ValueError(f"{linear} is not a linear that a LoRA adapts")
        if (b.shape[1], a.shape[0]) != weight.shape or a.shape[1] != b.shape[0]:
            shapes = f"{a.shape}, {b.shape}"
            raise ValueError(f"{linear}: LoRA factors {shapes} do not fit {weight.shape}")
        delta = (scale * b.T.astype(mx.float32)) @ a.T.astype(mx.float32)
        fused[f"{linear}.weight"] = weight.astype(mx.float32) + delta
    return fused


def save_adapter(
    folder: str | Path, model: SharedLLM, base_fingerprint: str, extra: dict | None = None
) -> None:
    """Write the model's trainable parameters as an adapter into `folder`, with the tree
    they were trained on and the settings they carry (settings.IN_ADAPTERS)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / ADAPTER_WEIGHTS), weights)
    meta = {
        "format": ADAPTER_FORMAT,
        "base_fingerprint": base_fingerprint,
        "parameters": {name: list(w.shape) for name, w in sorted(weights.items())},
        "tree": model.tree_dict(),
        **model.settings.to_dict(IN_ADAPTERS),
        **(extra or {}),
    }
    (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, mx.array]]:
    """(metadata, weights) of an adapter folder, or of a file inside one, refusing an
    adapter whose weights are not those its metadata lists, or whose settings are invalid."""
    folder = Path(path)
    folder = folder.parent if folder.is_file() else folder
    try:
        meta = json.loads((folder / ADAPTER_JSON).read_text())
        weights = mx.load(str(folder / ADAPTER_WEIGHTS))
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable adapter: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: {ADAPTER_JSON} must hold an object, not a {type(meta).__name__}")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an adapter (format {meta.get('format')!r})")
    try:
        _check_listed(meta.get("parameters"), weights)
        _check_lora_scale(meta, weights)
        Settings.from_dict({key: meta[key] for key in keys(IN_ADAPTERS) if key in meta})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return meta, weights


def _check_listed(listed: Any, weights: dict[str, mx.array]) -> None:
    """The weights are exactly the parameters adapter.json lists, in the listed shapes."""
    if not isinstance(listed, dict):
        raise ValueError(f"{ADAPTER_JSON} lists no parameters")
    missing, extra = sorted(set(listed) - set(weights)), sorted(set(weights) - set(listed))
    if missing:
        raise ValueError(f"the weights lack listed parameters {missing}")
    if extra:
        raise ValueError(f"the weights hold parameters it does not list: {extra}")
    for name, value in weights.items():
        if listed[name] != list(value.shape):
            raise ValueError(f"{name} has shape {value.shape}, listed as {listed[name]}")


def _check_lora_scale(meta: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """LoRA factors come with a positive `lora_scale`."""
    if any(k.endswith(LORA_FACTORS) for k in weights):
        scale = meta.get("lora_scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"LoRA factors need a positive lora_scale, not {scale!r}")


def _check_weights(
    params: dict[str, mx.array], trainable: set[str], weights: dict[str, mx.array]
) -> None:
    """Each weight is a parameter training writes, a finite float array of its shape."""
    floats = set(FLOAT_DTYPES.values())
    for name, value in weights.items():
        if name not in params:
            raise ValueError(f"the model has no parameter {name}")
        if name not in trainable:
            raise ValueError(f"{name} is not a parameter that training writes")
        if value.shape != params[name].shape:
            raise ValueError(f"{name} has shape {value.shape}, the model's is {params[name].shape}")
        if value.dtype not in floats or params[name].dtype not in floats:
            raise ValueError(f"{name} is {value.dtype}, the model's {params[name].dtype}")
        if not all_finite(value):
            raise ValueError(f"{name} holds inf or NaN")


def load_adapter(
    model: SharedLLM, path: str | Path, check_fingerprint: bool = True
) -> dict[str, Any]:
    """Put an adapter's weights into `model`, refusing one trained from another model.

    The model's injection is then "trained", and its settings take those the adapter
    records (settings.IN_ADAPTERS: the attention scale, the chunks a question reads, the
    re-reading). The description is unchanged. Returns the adapter's metadata.
    """
    meta, weights = read_adapter(path)
    ours = model.fingerprint()
    if check_fingerprint and meta.get("base_fingerprint") not in (ours, *model.aliases):
        raise ValueError(
            f"{path} was trained from a different model (fingerprint "
            f"{meta.get('base_fingerprint')}, this model is {ours})"
        )
    params = dict(tree_flatten(model.parameters()))
    try:
        weights = fuse_lora(params, weights, float(meta.get("lora_scale", 0.0)))
        _check_weights(params, trainable_names(model), weights)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    model.settings = model.settings.with_recorded(meta, IN_ADAPTERS)
    model.injection = "trained"
    return meta


def fuse(
    model_path: str | Path,
    adapter_path: str | Path,
    out: str | Path,
    force: bool = False,
    check_fingerprint: bool = True,
) -> Path:
    """Write a model folder `out`: the model at `model_path` with the adapter merged in.

    The folder is written to a temporary place and renamed, like `convert`; the
    tokenizer and the other side files are copied from `model_path`.
    """
    from .loading import load

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (force=True replaces it)")
    model, _ = load(model_path)
    load_adapter(model, adapter_path, check_fingerprint)
    config = model.config_dict()

    def write(tmp: Path) -> None:
        save_model_folder(tmp, model, config)
        copy_side_files(Path(model_path), tmp)

    write_atomically(out, force, write)
    return out
