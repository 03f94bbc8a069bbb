"""The memory planner: what a SharedLLM run will hold, worked out before anything loads.

A run goes through three phases, and its peak is the largest of them, on top of the
weights (resident throughout):

- selection: the query-aware policy runs the lower model's layer 0 over both halves
  of `compress_batch` chunks (2 x batch rows of chunk_len / 2 tokens). The tree does
  not exist yet.
- encoding: each batch of chunks is encoded by the lower model's M layers, the
  largest segment being chunk_len / 2 tokens; the whole tree is allocated.
- generation: mlx-lm's prefill (at most 2048 tokens at a time) and decode, with the
  tree and the upper model's KV cache for the running window.

Weights, tree and KV cache are exact byte counts of what MLX allocates. Activations
are counted in buffers of the shapes a LLaMA layer makes (attention scores, MLP,
hidden, query, key/value); how many of each are alive at the peak (`SELECT`,
`ENCODE`, `LAYER`) was measured on the CPU in float32 over varied shapes, and the
whole plan is checked against measured peaks by benchmarks/plan_vs_measured.py.
Metal's fused attention and RoPE hold fewer buffers, so there the plan errs high.

Rendering (the table, the fit verdict and advice) lives in plan_render.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.llama import ModelArgs as LlamaArgs

from .cache import FLOAT_DTYPES, SCORE_BLOCK_BYTES, TreeFormat
from .config import SharedLLMConfig, check_int, head_dim
from .io import config_of_folder, safetensors_headers
from .model import SharedLLM
from .settings import Settings, read_config
from .tree import downsample_count, plan_segments

GiB = 1 << 30
KV_STEP = 256  # mlx-lm's KVCache and QuantizedKVCache grow in steps of 256 tokens
PREFILL_STEP = 2048  # mlx-lm's generate_step prefills at most this many tokens at a time
WEIGHT_BITS = (2, 3, 4, 5, 6, 8)  # mx.quantize's affine widths; 16 and 32 mean float
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The most tokens the CLI takes in a count (about 10**15, beyond any run); the plan's
# cost does not depend on it.
MAX_TOKENS = 1 << 50

_LLAMA_2_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
# Named shapes: the base model's LLaMA arguments. Each is planned as SharedLLM stacked
# from one (lower = the bottom M layers, shared) with the default model's tree settings.
SHAPES: dict[str, dict] = {
    "llama-2-7b": _LLAMA_2_7B,
    "llama-3-8b": {
        **_LLAMA_2_7B,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    "smollm2-135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}
# Named shapes inject in their bottom 4 layers and read trees as Settings() builds them
# (depth 3, 32 tokens a node).
SHAPE_INJECTION = dict(num_injection_layers=4, chunk_len=1024)
# Named shapes are checkpoints released in 16-bit, and a Mac computes in bfloat16.
SHAPE_DTYPE = "bfloat16"
# PlanSettings.tree_bits for a float tree (in the compute dtype), whatever the model records.
FLOAT_TREE = "float"


@dataclass(frozen=True)
class Buffers:
    """How many buffers of each shape are alive at an activation peak, per row of tokens.

    Shapes, for a row of L tokens: scores (heads, L, keys), mlp (L, intermediate), hidden
    (L, hidden), query (L, heads x head_dim), kv (L, kv_heads x head_dim); `captured_kv`
    counts kv buffers per injection layer (the keys and values kept for the tree).
    """

    scores: float
    mlp: float
    hidden: float
    query: float
    kv: float
    captured_kv: float = 0.0

    def elements(self, args: LlamaArgs, rows: int, length: int, keys: int, layers: int = 0):
        """Elements in all these buffers for `rows` rows of `length` tokens."""
        dim = head_dim(args)
        per_token = (
            self.scores * args.num_attention_heads * keys
            + self.mlp * args.intermediate_size
            + self.hidden * args.hidden_size
            + self.query * args.num_attention_heads * dim
            + (self.kv + self.captured_kv * layers) * args.num_key_value_heads * dim
        )
        return rows * length * per_token


# Counts measured on the CPU in float32 over 32 to 56 shapes (hidden 128..2048, head_dim
# 16..128, 1..16 rows of 128..1024 tokens, M 2..8), with the error of the formula.
# A whole LLaMA layer, as in a prefill step of the upper model (-3%..+10%):
LAYER = Buffers(scores=1, mlp=2, hidden=4, query=9, kv=6)
# The selection's layer 0, which computes only the last token's query and MLP
# (-3%..-1%; -22% at head_dim 16):
SELECT = Buffers(scores=0, mlp=0, hidden=3, query=0, kv=5)
# The lower model's M layers over one segment, keeping every layer's keys and values
# (-2%..+6%):
ENCODE = Buffers(scores=1, mlp=2, hidden=6, query=7, kv=2, captured_kv=2)
# Blocks of injection scores alive at once (float32; measured 1.2 to 1.8).
INJECTION_BLOCKS = 1.5


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the weights: the upper model's and the lower model's own (0 when shared),
    stored in `dtype` or affine-quantized to `bits`."""

    upper: int
    lower: int
    dtype: str
    bits: int | None = None
    group_size: int = 64

    @property
    def label(self) -> str:
        return self.dtype if self.bits is None else f"{self.bits}-bit (group {self.group_size})"


@dataclass(frozen=True)
class PlanSettings:
    """What a run is planned for.

    `dtype` is the compute dtype (activations, float caches, quantization scales);
    `tree_bits` says how the tree is stored: 4 or 8 bits (in groups of `tree_group_size`)
    or FLOAT_TREE, in `dtype`; None (default) plans the tree format the model's settings
    record (`Settings.tree_format`, the one `compress` builds), float in `dtype` when they
    record none. `running_tokens` is the upper model's window: the context's remainder
    (< chunk_len), the prompt and the generated tokens (default chunk_len + 1024).
    `compress_batch` defaults to the model's.
    """

    context_tokens: int
    dtype: str = SHAPE_DTYPE
    tree_bits: int | str | None = None
    tree_group_size: int = 64
    kv_bits: int | None = None
    kv_group_size: int = 64
    running_tokens: int | None = None
    compress_batch: int | None = None

    def __post_init__(self) -> None:
        check_int("context_tokens", self.context_tokens, 0)
        if self.running_tokens is not None:
            check_int("running_tokens", self.running_tokens, 1)
        if self.compress_batch is not None:
            check_int("compress_batch", self.compress_batch, 1)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a run holds, by component and by phase (see the module docstring)."""

    name: str
    config: SharedLLMConfig
    model_settings: Settings
    settings: PlanSettings
    weights: WeightBytes
    n_chunks: int
    tree_entries: int
    running_tokens: int
    compress_batch: int
    tree_cache: int
    kv_cache: int
    selection_activations: int
    encoding_activations: int
    generation_activations: int
    tree_format: TreeFormat  # how the tree is stored (planned_tree_format)
    tree_layers: int = 0  # injection layers, each storing a tree

    @property
    def phases(self) -> dict[str, int]:
        """Bytes above the weights in each phase."""
        return {
            "selection": self.selection_activations,
            "encoding": self.tree_cache + self.encoding_activations,
            "generation": self.tree_cache + self.kv_cache + self.generation_activations,
        }

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> int:
        return self.weights.upper + self.weights.lower + max(self.phases.values())

    def replan(self, **changes) -> MemoryPlan:
        """The same model with other settings (weights unchanged)."""
        settings = dataclasses.replace(self.settings, **changes)
        return make_plan(self.config, self.model_settings, settings, self.weights, self.name)


# -- the plan --------------------------------------------------------------------------


def make_plan(
    config: SharedLLMConfig,
    model_settings: Settings,
    settings: PlanSettings,
    weights: WeightBytes,
    name: str = "",
) -> MemoryPlan:
    """Plan a run of `config`, building trees as `model_settings` say, with `settings`,
    the weights taking `weights`; each of the config's injection layers stores a tree."""
    s, t, lower = settings, model_settings, config.lower or config.upper
    n_chunks = s.context_tokens // config.chunk_len
    lengths = segment_lengths(config, t)
    entries = n_chunks * sum(downsample_count(n, t.keep_tokens, t.keep_fraction) for n in lengths)
    running = s.running_tokens or config.chunk_len + 1024
    batch = s.compress_batch or t.compress_batch
    rows, size = min(batch, n_chunks), FLOAT_DTYPES[s.dtype].size
    tree_fmt = planned_tree_format(s, t)
    kv_fmt = TreeFormat(s.dtype, s.kv_bits, s.kv_group_size)
    tree_layers = len(config.injection_layers)
    tree_vectors = 2 * tree_layers * entries * lower.num_key_value_heads
    half = config.chunk_len // 2
    selects = t.policy == "query" and t.tree_depth > 1
    return MemoryPlan(
        name=name or "model",
        config=config,
        model_settings=t,
        settings=s,
        weights=weights,
        n_chunks=n_chunks,
        tree_entries=entries,
        running_tokens=running,
        compress_batch=batch,
        tree_cache=int(tree_vectors * tree_fmt.entry_bytes(head_dim(lower))),
        kv_cache=kv_cache_bytes(config.upper, running, kv_fmt),
        selection_activations=int(selects * size * SELECT.elements(lower, 2 * rows, half, half)),
        encoding_activations=int(size * encoding_elements(config, t, rows)),
        generation_activations=generation_bytes(config, s, running, entries),
        tree_format=tree_fmt,
        tree_layers=tree_layers,
    )


def planned_tree_format(s: PlanSettings, model_settings: Settings) -> TreeFormat:
    """The format the planned tree is stored in: the one `s.tree_bits` asks for, else the
    one `model_settings` record (what `compress` builds with them), else float in the
    compute dtype (as `compress` builds when none is recorded)."""
    if s.tree_bits is None:
        return model_settings.tree_format or TreeFormat(s.dtype)
    bits = None if s.tree_bits == FLOAT_TREE else s.tree_bits
    return TreeFormat(s.dtype, bits, s.tree_group_size)


def segment_lengths(config: SharedLLMConfig, settings: Settings) -> list[int]:
    """Lengths of the segments each chunk is encoded as (leaves first)."""
    keep_left = lambda node, half: np.zeros(len(node), np.int64)  # noqa: E731
    plan = plan_segments(1, config.chunk_len, settings.tree_depth, config.layout, keep_left)
    return plan.lengths


def encoding_elements(config: SharedLLMConfig, settings: Settings, rows: int) -> float:
    """Encoding a batch: the longest segment through the M layers, while the other
    segments' keys and values (every layer's) wait to be written with it."""
    lower, m = config.lower or config.upper, config.num_injection_layers
    lengths = segment_lengths(config, settings)
    longest, others = max(lengths), sum(lengths) - max(lengths)
    waiting = ENCODE.captured_kv * m * lower.num_key_value_heads * head_dim(lower)
    return ENCODE.elements(lower, rows, longest, longest, m) + rows * others * waiting


def kv_cache_bytes(args: LlamaArgs, tokens: int, fmt: TreeFormat) -> int:
    """mlx-lm's KV cache (keys and values, every layer) holding `tokens` tokens."""
    capacity = -(-tokens // KV_STEP) * KV_STEP
    vectors = 2 * args.num_hidden_layers * args.num_key_value_heads * capacity
    return int(vectors * fmt.entry_bytes(head_dim(args)))


def generation_bytes(
    config: SharedLLMConfig, s: PlanSettings, running: int, tree_entries: int
) -> int:
    """Activations of the largest of mlx-lm's prefill steps over the running window
    (at most 2048 tokens each; decoding one token at a time holds less).

    A step's bytes grow with the keys it attends to, so of the full steps the last one
    is the largest; the other candidate is the partial step that ends the window.
    """
    full, rest = divmod(running, PREFILL_STEP)
    steps = [(PREFILL_STEP, full * PREFILL_STEP)] if full else []
    steps += [(rest, running)] if rest else []
    return max(prefill_step_bytes(config, s, n, keys, tree_entries) for n, keys in steps)


def prefill_step_bytes(
    config: SharedLLMConfig, s: PlanSettings, tokens: int, keys: int, tree_entries: int
) -> int:
    """One prefill step of `tokens` tokens attending to `keys` keys: an upper layer, the
    injection's float32 score blocks (cache.tree_attention's block size), and with a
    quantized KV cache the step's float keys and values, which mlx-lm quantizes after."""
    args, size = config.upper, FLOAT_DTYPES[s.dtype].size
    heads = args.num_attention_heads
    block = min(max(256, SCORE_BLOCK_BYTES // (4 * heads * tokens)), tree_entries)
    injection = INJECTION_BLOCKS * 4 * heads * tokens * block
    float_kv = 0
    if s.kv_bits is not None:
        float_kv = kv_cache_bytes(args, tokens, TreeFormat(s.dtype))
    return int(size * LAYER.elements(args, 1, tokens, keys) + injection + float_kv)


# -- weights ---------------------------------------------------------------------------


def weight_bytes(
    config: SharedLLMConfig, bits: int | None, dtype: str, group_size: int = 64
) -> WeightBytes:
    """The weights of `config` stored in `dtype`, or affine-quantized to `bits` as
    `mlx-sharedllm convert -q` does (mlx-lm's rule: every Linear and Embedding whose
    input size is a multiple of the group). The model is built lazily: nothing is
    computed or allocated, only shapes are read."""
    model = SharedLLM(config)
    model.set_dtype(FLOAT_DTYPES[dtype])
    if bits is not None:
        nn.quantize(
            model,
            group_size,
            bits,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
            ),
        )
    sizes = {"upper": 0, "lower": 0}
    for name, value in tree_flatten(model.parameters()):
        sizes["lower" if name.startswith("encoder.") else "upper"] += value.nbytes
    return WeightBytes(sizes["upper"], sizes["lower"], dtype, bits, group_size)


def stored_weights(path: Path, quantization: dict | None) -> WeightBytes:
    """The weights as stored in a converted folder; their dtype is the final norm's (never
    quantized), the model's compute dtype. Only the file headers are read."""
    headers = safetensors_headers(path)
    sizes = {"upper": 0, "lower": 0}
    for name, entry in headers.items():
        start, end = entry["data_offsets"]
        sizes["lower" if name.startswith("encoder.") else "upper"] += end - start
    if "model.norm.weight" not in headers:
        raise ValueError(f"{path} is not a converted SharedLLM folder (no model.norm.weight)")
    dtype = STORED_DTYPES[headers["model.norm.weight"]["dtype"]]
    q = quantization or {}
    return WeightBytes(
        sizes["upper"], sizes["lower"], dtype, q.get("bits"), q.get("group_size", 64)
    )


# -- entry points ----------------------------------------------------------------------


def shape_config(name: str) -> SharedLLMConfig:
    """A named shape as SharedLLM stacked from one."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    upper = {"model_type": "llama", **SHAPES[name]}
    return SharedLLMConfig(upper=upper, lower=None, **SHAPE_INJECTION)


def check_weight_bits(bits: int | None, dtype: str) -> int | None:
    """Quantized bits, or None for float weights; 16 and 32 must match `dtype`."""
    if bits is None or bits in WEIGHT_BITS:
        return bits
    if bits in (16, 32) and FLOAT_DTYPES[dtype].size * 8 == bits:
        return None
    raise ValueError(
        f"weight bits must be one of {WEIGHT_BITS} (quantized), or {FLOAT_DTYPES[dtype].size * 8} "
        f"for unquantized {dtype}; got {bits}"
    )


def plan_for_shape(
    name: str, context_tokens: int, weight_bits: int | None = None, **settings
) -> MemoryPlan:
    """Plan a named shape; `settings` are PlanSettings fields (dtype default bfloat16)."""
    config = shape_config(name)
    s = PlanSettings(context_tokens, **settings)
    weights = weight_bytes(config, check_weight_bits(weight_bits, s.dtype), s.dtype)
    return make_plan(config, Settings(), s, weights, name)


def plan_for_model_dir(
    path: str | Path,
    context_tokens: int,
    tree_bits: int | str | None = None,
    kv_bits: int | None = None,
    *,
    weight_bits: int | None = None,
    **settings,
) -> MemoryPlan:
    """Plan a converted model folder without loading it: config.json and the headers
    of its safetensors files. The tree is planned in the format config.json records
    (its `tree_format`) unless `tree_bits` says otherwise (PlanSettings). `weight_bits`
    plans other weights than the stored ones (as if converted with -q); `settings` are
    other PlanSettings fields (the compute dtype defaults to the model's)."""
    path = Path(path)
    params = config_of_folder(path)
    config, model_settings = read_config(params)
    weights = stored_weights(path, params.get("quantization"))
    s = PlanSettings(context_tokens, **{"dtype": weights.dtype, **settings})
    s = dataclasses.replace(s, tree_bits=tree_bits, kv_bits=kv_bits)
    if weight_bits is not None:
        weights = weight_bytes(config, check_weight_bits(weight_bits, s.dtype), s.dtype)
    return make_plan(config, model_settings, s, weights, str(path))


# -- this machine ----------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    """The memory a run may use on this machine, and where that number comes from."""

    bytes: int
    source: str


def memory_budget() -> MemoryBudget | None:
    """The Metal recommended working set on a Mac, else MemAvailable from /proc/meminfo;
    None when neither is known."""
    if mx.metal.is_available():
        size = mx.device_info()["max_recommended_working_set_size"]
        return MemoryBudget(int(size), "Metal's recommended working set (mx.device_info)")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return MemoryBudget(int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo")
    return None


def max_context_tokens(plan: MemoryPlan, budget: int) -> int | None:
    """The longest context (whole chunks) whose plan fits `budget`; None if none does."""
    chunk = plan.config.chunk_len
    fits = lambda n: plan.replan(context_tokens=n * chunk).total <= budget  # noqa: E731
    if not fits(0):
        return None
    low, high = 0, max(1, plan.n_chunks)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low * chunk


@contextlib.contextmanager
def wired_limit(plan: MemoryPlan) -> Iterator[None]:
    """On Metal, wire the planned bytes (at most the recommended working set) while the
    block runs, then restore the old limit, as mlx-lm's `wired_limit` does; elsewhere,
    nothing."""
    if not mx.metal.is_available():
        yield
        return
    limit = min(plan.total, mx.device_info()["max_recommended_working_set_size"])
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
