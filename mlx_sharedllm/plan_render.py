"""The memory plan as text: the table of components and phases, the verdict against
this machine's memory, and the changes that would make a refused run fit."""

from __future__ import annotations

from .plan import GiB, MemoryBudget, MemoryPlan, max_context_tokens, memory_budget


def plan_table(plan: MemoryPlan) -> str:
    """The plan as a table: a row per component, then the phases the total comes from."""
    s, c = plan.settings, plan.config
    shared = " (stacked from one)" if c.stacked else ""
    compression = max(plan.selection_activations, plan.encoding_activations)
    lines = [
        f"{plan.name}: {s.context_tokens:,} context tokens = {plan.n_chunks:,} chunks of "
        f"{c.chunk_len} -> {plan.tree_entries:,} tree entries",
        f"weights {plan.weights.label}, "
        f"tree {_format_label(plan.tree_format.bits, plan.tree_format.dtype)}, "
        f"KV {_format_label(s.kv_bits, s.dtype)}, compute {s.dtype}, "
        f"compress batch {plan.compress_batch}",
        "",
        _row("upper weights", plan.weights.upper),
        _row(f"lower weights, not shared{shared}", plan.weights.lower),
        _row(f"tree cache ({_tree_layers_text(plan)})", plan.tree_cache),
        _row(f"upper KV cache ({plan.running_tokens:,}-token window)", plan.kv_cache),
        _row("activation peak, compression", compression),
        _row("activation peak, generation", plan.generation_activations),
        "-" * 58,
        _row("total", plan.total),
        "",
        "total = weights + the largest phase:",
    ]
    parts = {
        "selection": "activations",
        "encoding": "tree + activations",
        "generation": "tree + KV cache + activations",
    }
    for phase, size in plan.phases.items():
        peak = "  (peak)" if phase == plan.peak_phase else ""
        lines.append(_row(f"  {phase}: {parts[phase]}", size) + peak)
    return "\n".join(lines)


def _tree_layers_text(plan: MemoryPlan) -> str:
    m = plan.config.num_injection_layers
    return f"{m} layers" if plan.tree_layers == m else f"{plan.tree_layers} of {m} layers"


def _row(label: str, size: int) -> str:
    return f"{label:<46}{format_bytes(size):>12}"


def format_bytes(size: float) -> str:
    if size >= GiB:
        return f"{size / GiB:.2f} GiB"
    return f"{size / (1 << 20):.1f} MiB"


def _format_label(bits: int | None, dtype: str) -> str:
    return dtype if bits is None else f"{bits}-bit"


def fit_line(plan: MemoryPlan, budget: MemoryBudget | None) -> str:
    """One line comparing the plan's total with this machine's memory."""
    if budget is None:
        return "this machine reports no memory figure: cannot tell whether it fits"
    verdict = "fits" if plan.total <= budget.bytes else "does NOT fit"
    return f"{format_bytes(plan.total)} {verdict} in {format_bytes(budget.bytes)} ({budget.source})"


def check_fits(plan: MemoryPlan, budget: MemoryBudget | None = None) -> str | None:
    """None when the plan fits this machine (or its memory is unknown); else the
    refusal: the table, the comparison, and what would make it fit."""
    budget = budget or memory_budget()
    if budget is None or plan.total <= budget.bytes:
        return None
    lines = [plan_table(plan), "", fit_line(plan, budget)]
    tips = suggestions(plan, budget)
    if tips:
        lines += ["what would fit:"] + [f"  - {tip}" for tip in tips]
    lines.append("or pass --force to run anyway")
    return "\n".join(lines)


def suggestions(plan: MemoryPlan, budget: MemoryBudget) -> list[str]:
    """Changes that bring the plan within `budget`, each with its new total."""
    s, tips = plan.settings, []
    options = []
    if plan.tree_format.bits != 4:
        options.append(("--tree-bits 4", {"tree_bits": 4}))
    if s.kv_bits != 4:
        options.append(("--kv-bits 4", {"kv_bits": 4}))
    if len(options) == 2:
        options.append(("--tree-bits 4 --kv-bits 4", {"tree_bits": 4, "kv_bits": 4}))
    batch = plan.compress_batch // 2
    while batch >= 1:
        options.append((f"compress_batch {batch} (in config.json)", {"compress_batch": batch}))
        batch //= 2
    for text, changes in options:
        total = plan.replan(**changes).total
        if total <= budget.bytes:
            tips.append(f"{text}: {format_bytes(total)}")
    if plan.weights.bits is None:
        tips.append("quantized weights (`mlx-sharedllm convert -q`)")
    most = max_context_tokens(plan, budget.bytes)
    if most is not None:
        tips.append(f"a shorter text: at most {most:,} context tokens fit with these settings")
    return tips
