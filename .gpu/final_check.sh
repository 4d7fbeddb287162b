#!/bin/bash
# One GPU call: fused LM loss (CUDA tests + bench lm-loss), then the 8B leaderboard step side by side.
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_final}; W=/tmp/final; mkdir -p "$OUT" $W
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
echo "== LCE CUDA tests"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/ops/linear_cross_entropy tests/training/test_loss.py \
  2>&1 | tail -n 30 | tee $W/lce_tests.txt
echo "== bench lm-loss"
timeout 100 python3 -m cs336_systems bench lm-loss --tokens 65536 --vocab 151936 --rep-ms 400 \
  --out-dir $W/lm 2>&1 | grep -v "$F" | tail -n 20 | tee $W/lm.log
echo "== bench step 8b-32k"
timeout ${STEP_TIMEOUT:-330} python3 -m cs336_systems bench step --preset 8b-32k --steps 2 --warmup 1 \
  --contenders ${CONTENDERS:-ours@selective stock ours ours-sdpa@selective} --out-dir $W/step 2>&1 | grep -v "$F" \
  | tee $W/step.log
cp $W/lm/lm_loss.md $W/lm/lm_loss.json $W/step/step.md $W/step/step.json $W/step/step.png "$OUT"/ 2>/dev/null
cat $W/lce_tests.txt $W/lm.log $W/step.log > "$OUT"/log.txt
echo "== summary"; tail -n 2 $W/lce_tests.txt; cat $W/lm/lm_loss.md $W/step/step.md 2>/dev/null
