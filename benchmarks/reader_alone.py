"""The reader alone: how well does the model answer from the lines re-reading gives it?

    python benchmarks/reader_alone.py --frame shipped --plans 12
    python benchmarks/reader_alone.py --frame question-first --first-plan 12 --plans 30 \
        --tasks multivalue,single-word

For a needle question, re-reading's focus keeps the sentences of the question's facts,
numbered one per line in document order (decoys and the text around weigh less). This
builds that message straight from dev plans (`suite_data.plan_haystack`), with no
haystack, tree or ranking, and asks the model with no context: a fast loop over how the
message is framed, the one part of the answer that ranking cannot help. Dev plans only;
a frame chosen here still has to hold through `read_suite.py` and `probe_kinds.py`, on
book questions and other needle kinds (benchmarks/results/suite_dev_question_first.log).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import mlx_sharedllm  # noqa: E402,F401,I001  (OpenBLAS before mlx, on Linux)

import suite_data as sd  # noqa: E402
from mlx_sharedllm.generate import REREAD_MESSAGE, Prompt, generate  # noqa: E402
from mlx_sharedllm.loading import load  # noqa: E402

SYSTEM = "Answer the question with the words of the text."
FRAMES = ("shipped", "question-first", "asked-first", "system")


def message(question: sd.Question, plan: sd.HaystackPlan, frame: str) -> Prompt:
    """The re-read message for `question` under `frame`: the shipped REREAD_MESSAGE, the
    question also before the text (without, or with, the shipped instruction line), or
    the shipped one after a system prompt."""
    facts = sorted((plan.facts[i] for i in question.facts), key=lambda f: f.depth)
    text = "\n".join(f"{i}. {f.text}" for i, f in enumerate(facts, 1))
    if frame == "question-first":
        return f"Question: {question.prompt}\n\nText:\n{text}\n\nQuestion: {question.prompt}"
    if frame == "asked-first":
        return REREAD_MESSAGE.replace("Text:", f"Question: {question.prompt}\n\nText:").format(
            passages=text, prompt=question.prompt
        )
    shipped = REREAD_MESSAGE.format(passages=text, prompt=question.prompt)
    if frame == "system":
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": shipped}]
    return shipped


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--frame", choices=FRAMES, default="shipped")
    p.add_argument("--first-plan", type=int, default=0)
    p.add_argument("--plans", type=int, default=12)
    p.add_argument("--tasks", default=None, help="comma-separated (default: every needle task)")
    p.add_argument("--out", default=None, help="JSONL file of answers (appended)")
    a = p.parse_args(argv)
    model, tokenizer = load(a.model) if a.model else load()
    tasks = set(a.tasks.split(",")) if a.tasks else set(sd.TASKS)
    score: dict[str, list[int]] = {}
    for seed in range(a.first_plan, a.first_plan + a.plans):
        plan = sd.plan_haystack(np.random.default_rng([7, seed]), "dev")
        for q in (q for q in plan.questions if q.task in tasks):
            tokens = 40 * max(1, len(q.answers))
            answer = generate(model, tokenizer, message(q, plan, a.frame), max_tokens=tokens)
            right = bool(sd.is_correct(q, answer))
            cell = score.setdefault(q.task, [0, 0])
            cell[0], cell[1] = cell[0] + right, cell[1] + 1
            if a.out:
                row = {"frame": a.frame, "plan": seed, "task": q.task, "question": q.prompt,
                       "answer": answer, "want": q.answers, "correct": right}  # fmt: skip
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    cells = ", ".join(f"{t} {k}/{n}" for t, (k, n) in sorted(score.items()))
    total = sum(k for k, _ in score.values()), sum(n for _, n in score.values())
    print(f"{a.frame}: {cells}; all {total[0]}/{total[1]}")


if __name__ == "__main__":
    main()
