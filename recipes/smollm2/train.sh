#!/usr/bin/env bash
# The exact commands that made mlx_sharedllm/weights/smollm2-135m-m4 (see README.md here).
# Run from the repository root; rerun with --resume appended to continue a stopped run.
set -euo pipefail
DATA=${DATA:-data/smollm2}
RUN=${RUN:-recipes/smollm2/run}
python recipes/smollm2/make_data.py --out "$DATA" --seed 0
BASE=$(python -c 'from mlx_sharedllm.default import default_base_model; print(default_base_model())')
mlx-sharedllm train --model "$BASE" \
  --data "$DATA"/lm/botchan-train.txt --data "$DATA"/lm/alice.txt \
  --data "$DATA"/lm/sherlock-holmes.txt --data "$DATA"/lm/war-and-peace.txt \
  --context-chunks 3 --window 256 \
  --steps 60 --grad-accum 4 --lr 5e-4 --warmup 5 --min-lr 5e-5 \
  --save-every 5 --seed 0 \
  -o "$RUN" "$@"
python recipes/smollm2/install_adapter.py "$RUN"
