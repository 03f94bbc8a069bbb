#!/usr/bin/env bash
# The exact commands that made mlx_sharedllm/weights/smollm2-135m-m19 (see README.md here).
# Run from the repository root. A stopped stage reruns with the same command plus --resume.
set -euo pipefail
DATA=${DATA:-data/smollm2}
RUN=${RUN:-recipes/smollm2/run}
RUN2=${RUN2:-recipes/smollm2/run2}
RUN3=${RUN3:-recipes/smollm2/run3}
BASE=$(python -c 'from mlx_sharedllm.default import default_base_model; print(default_base_model())')
BOOKS=(--data "$DATA"/lm/botchan-train.txt --data "$DATA"/lm/alice.txt
  --data "$DATA"/lm/sherlock-holmes.txt --data "$DATA"/lm/war-and-peace.txt)

# Stage 1: the eight fixed templates, loss on the answers (100-step schedule, ended at 77).
python recipes/smollm2/make_data.py --out "$DATA" --max-chunks 3 --seed 0
mlx-sharedllm train --model "$BASE" --task mix --lm-weight 0.25 \
  --data "$DATA"/needles_train.jsonl "${BOOKS[@]}" \
  --eval-data "$DATA"/needles_val.jsonl --eval-every 20 --eval-examples 4 \
  --injection-layers 17,18 --context-chunks 2 --window 256 \
  --steps 100 --stop-after 77 --grad-accum 4 --lr 3e-4 --warmup 5 --min-lr 3e-5 \
  --save-every 5 --seed 0 -o "$RUN"
mlx-sharedllm fuse "$RUN" "$DATA"/stage1-model --model "$BASE" --force

# Stage 2: random phrasings and keys, and the attention loss on each answer's evidence.
python recipes/smollm2/make_data.py --out "$DATA"/varied --style varied --needles 5,9 \
  --max-chunks 2 --evidence --train-examples 2000 --val-examples 16 --seed 1
mlx-sharedllm train --model "$DATA"/stage1-model --task mix --lm-weight 0.15 \
  --data "$DATA"/varied/needles_train.jsonl "${BOOKS[@]}" \
  --eval-data "$DATA"/varied/needles_val.jsonl --eval-every 25 --eval-examples 4 \
  --injection-layers 17,18 --attention-loss 1.0 --context-chunks 1 --window 256 \
  --steps 100 --stop-after 80 --grad-accum 4 --lr 3e-4 --warmup 3 --min-lr 3e-5 \
  --save-every 5 --seed 0 \
  -o "$RUN2"
mlx-sharedllm fuse "$RUN2" "$DATA"/stage2-model --model "$DATA"/stage1-model --force

# Stage 3: the same data in long trees (distractor chunks up to 64K tokens) with the
# attention sharpened by log(entries)/log(2048) beyond stage 2's 2,048 entries.
mlx-sharedllm train --model "$DATA"/stage2-model --task mix --lm-weight 0.15 \
  --data "$DATA"/varied/needles_train.jsonl "${BOOKS[@]}" \
  --eval-data "$DATA"/varied/needles_val.jsonl --eval-every 10 --eval-examples 4 \
  --injection-layers 17,18 --attention-loss 1.0 --context-chunks 1 --window 256 \
  --distractors "$DATA"/lm/sherlock-holmes.txt --distractor-chunks 64 \
  --log-scale-entries 2048 \
  --steps 40 --grad-accum 4 --lr 2e-4 --warmup 2 --min-lr 2e-5 \
  --save-every 5 --seed 2 \
  -o "$RUN3"
python recipes/smollm2/install_adapter.py "$RUN3"
