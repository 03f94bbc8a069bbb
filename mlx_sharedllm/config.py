"""Declared configuration of a SharedLLM stack."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import Any

from mlx_lm.models.llama import ModelArgs as LlamaArgs

# How the injection weights came to be: trained, or initialised by stacking from one.
INJECTIONS = ("trained", "zero", "copy")
LAYOUTS = ("paper", "reference")
# A chunk is encoded whole by the lower model; beyond this no run is practical, and the
# tree planner and checks would work on absurd numbers.
MAX_CHUNK_LEN = 1 << 20
# LLaMA sizes, positive integers where given; the first five must be given.
LLAMA_SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
LLAMA_REQUIRED_SIZES = LLAMA_SIZES[:5]
# Far above any real model's size, far below what would overflow the planner's arithmetic
# or make a config alone allocate a bomb.
MAX_LLAMA_SIZE = 1 << 24


def _check_present(cls: type, params: dict[str, Any], which: str) -> None:
    """Refuse `params` that lack a field of the dataclass `cls` without a default."""
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in params]
    if missing:
        raise ValueError(f"{which} lacks {', '.join(missing)}")


def is_int(value: Any) -> bool:
    """True for an integer, but not a bool (JSON's true is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Refuse a setting that is not an integer (bools included) in low..high."""
    if not is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _llama_args(value: LlamaArgs | dict[str, Any], which: str) -> LlamaArgs:
    if isinstance(value, LlamaArgs):
        _check_llama(vars(value), which)
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{which} must be an object of LLaMA settings, got {value!r}")
    value = {"model_type": "llama", **value}
    _check_present(LlamaArgs, value, which)
    _check_llama(value, which)
    return LlamaArgs.from_dict(value)


def _check_llama(settings: dict[str, Any], which: str) -> None:
    """The LLaMA settings SharedLLM computes with: positive integer sizes, positive
    finite rms_norm_eps and rope_theta."""
    for name in LLAMA_SIZES:
        if settings.get(name) is not None or name in LLAMA_REQUIRED_SIZES:
            check_int(f"{which}.{name}", settings.get(name), 1, MAX_LLAMA_SIZE)
    for name in ("rms_norm_eps", "rope_theta"):
        value = settings.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{which}.{name} must be a number, got {value!r}")
        if not 0 < value < math.inf:
            raise ValueError(f"{which}.{name} must be positive and finite, got {value}")
    hidden, heads = settings["hidden_size"], settings["num_attention_heads"]
    if settings.get("head_dim") is None and hidden % heads:
        raise ValueError(
            f"{which}.hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
            "(and no head_dim is given)"
        )


@dataclass(frozen=True)
class SharedLLMConfig:
    """Everything that defines a SharedLLM stack.

    `upper` is the decoder (all N layers run); `lower` is the compressor, of which only
    the first `num_injection_layers` (M) layers exist and run. The upper layers listed
    in `injection_layers` (default: all of 0..M-1, the released checkpoints' "bottom M
    layers") read the context tree through an injection block, each from the lower
    layer of the same index; only they have injection blocks and tree storage.
    `lower=None` stacks the model from one: the compressor is the upper model's own
    bottom M layers (shared weights). `chunk_len` is the length of the chunks the lower
    model encodes, `layout` how chunk positions are counted (the released code's
    "reference", or the paper's), `injection` how the folder's injection weights came
    to be (a model that loads an adapter says so itself: `SharedLLM.injection`).
    The description is fixed once made; what a run chooses is in settings.py.
    """

    upper: LlamaArgs
    lower: LlamaArgs | None
    num_injection_layers: int
    injection_layers: tuple[int, ...] | None = None
    chunk_len: int = 1024
    layout: str = "paper"
    injection: str = "trained"
    model_type: str = "sharedllm"
    quantization: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Normalised once here; frozen afterwards (another description is another model).
        fix = partial(object.__setattr__, self)
        fix("upper", _llama_args(self.upper, "upper"))
        fix("lower", None if self.lower is None else _llama_args(self.lower, "lower"))
        m = self.num_injection_layers
        if self.injection_layers is None and is_int(m):
            fix("injection_layers", tuple(range(m)))
        elif self.injection_layers is not None:
            fix("injection_layers", _layer_list(self.injection_layers))
        self._validate()
        if self.lower is not None and self.lower.num_hidden_layers > self.num_injection_layers:
            # Nothing above layer M of the lower model ever runs.
            lower = dataclasses.replace(
                self.lower, num_hidden_layers=self.num_injection_layers, layer_types=None
            )
            fix("lower", lower)

    @property
    def stacked(self) -> bool:
        """True when the lower model is the upper model's bottom layers."""
        return self.lower is None

    def _validate(self) -> None:
        m, up, low = self.num_injection_layers, self.upper, self.lower or self.upper
        check_int("num_injection_layers", m, 1, up.num_hidden_layers)
        layers = self.injection_layers
        if not layers or layers[-1] != m - 1:
            raise ValueError(
                f"injection_layers {list(layers)} must be a non-empty list of layers below "
                f"num_injection_layers ({m}) that ends with layer {m - 1}, the last one the "
                "compressor runs"
            )
        check_int("chunk_len", self.chunk_len, 2, MAX_CHUNK_LEN)
        _check_quantization(self.quantization)
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if low.num_hidden_layers < m:
            raise ValueError(
                f"the lower model has {low.num_hidden_layers} layers, fewer than M={m}"
            )
        if head_dim(up) != head_dim(low):
            raise ValueError(
                f"upper head_dim {head_dim(up)} != lower head_dim {head_dim(low)}: "
                "the upper queries attend over the lower keys"
            )
        if up.num_attention_heads % low.num_key_value_heads:
            raise ValueError(
                f"upper heads ({up.num_attention_heads}) must be a multiple of the lower "
                f"key/value heads ({low.num_key_value_heads})"
            )

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> SharedLLMConfig:
        """Build from a config.json dict; other keys (the settings) are ignored."""
        if not isinstance(params, dict):
            raise ValueError(f"a config must be an object, got {type(params).__name__}")
        _check_present(cls, params, "the config")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def tree_dict(self) -> dict[str, Any]:
        """What of the description a context tree depends on (the injection layers only
        where they are not all of 0..M-1, so that trees of such models read as before);
        settings.py adds the tree settings."""
        keys = ("num_injection_layers", "chunk_len", "layout")
        out = {k: getattr(self, k) for k in keys}
        if not self.injects_everywhere:
            out["injection_layers"] = list(self.injection_layers)
        return out

    @property
    def injects_everywhere(self) -> bool:
        """True when every one of the M compressor layers injects (the paper's layout)."""
        return self.injection_layers == tuple(range(self.num_injection_layers))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.injects_everywhere:
            del out["injection_layers"]  # as configs were written before the field existed
        else:
            out["injection_layers"] = list(self.injection_layers)
        out["upper"] = _args_dict(self.upper)
        out["lower"] = None if self.lower is None else _args_dict(self.lower)
        if out["quantization"] is None:
            del out["quantization"]
        return out


def _args_dict(args: LlamaArgs) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


def _layer_list(layers: Any) -> tuple[int, ...]:
    """Distinct non-negative layer indices, sorted."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"injection_layers must be a list of layer indices, got {layers!r}")
    out = tuple(layers)
    if not all(is_int(i) and i >= 0 for i in out) or len(set(out)) != len(out):
        raise ValueError(f"injection_layers must be distinct layer indices, got {list(out)}")
    return tuple(sorted(out))


def head_dim(args: LlamaArgs) -> int:
    return args.head_dim or args.hidden_size // args.num_attention_heads


def _check_quantization(quantization: Any) -> None:
    """mlx-lm's quantization entry: None, or an object whose bits and group size (when
    given) are integers; per-layer entries are mlx-lm's to read."""
    if quantization is None:
        return
    if not isinstance(quantization, dict):
        raise ValueError(f"quantization must be an object, got {quantization!r}")
    for name in ("bits", "group_size"):
        if name in quantization:
            check_int(f"quantization.{name}", quantization[name], 1)
