#!/usr/bin/env bash
# The exact commands that made mlx_sharedllm/weights/smollm2-135m-m19 (see README.md here).
# Run from the repository root; rerun with --resume appended to continue a stopped run.
set -euo pipefail
DATA=${DATA:-data/smollm2}
RUN=${RUN:-recipes/smollm2/run}
python recipes/smollm2/make_data.py --out "$DATA" --max-chunks 3 --seed 0
BASE=$(python -c 'from mlx_sharedllm.default import default_base_model; print(default_base_model())')
mlx-sharedllm train --model "$BASE" --task mix --lm-weight 0.25 \
  --data "$DATA"/needles_train.jsonl \
  --data "$DATA"/lm/botchan-train.txt --data "$DATA"/lm/alice.txt \
  --data "$DATA"/lm/sherlock-holmes.txt --data "$DATA"/lm/war-and-peace.txt \
  --eval-data "$DATA"/needles_val.jsonl --eval-every 20 --eval-examples 4 \
  --injection-layers 17,18 --context-chunks 2 --window 256 \
  --steps 100 --grad-accum 4 --lr 3e-4 --warmup 5 --min-lr 3e-5 \
  --save-every 5 --seed 0 \
  -o "$RUN" "$@"
python recipes/smollm2/install_adapter.py "$RUN"
