#!/bin/bash
# One GPU session for `bench step` / `bench memory` / the activation-checkpointing CUDA tests.
# Run from the repository root on the GPU machine: bash .gpu/step_check.sh  (OUT: where results go)
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/gpu_step_check}
W=/tmp/step_check
mkdir -p "$OUT" $W
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

echo "== (a) CUDA tests"
timeout 90 python3 -m pytest -q -m cuda -p no:cacheprovider tests/parallel/test_activation_checkpointing.py \
    tests/training/test_optim.py 2>&1 | tail -n 25 | tee $W/tests.txt

# The 8B widths at the leaderboard's context and batch, 4 layers. Until lm_loss uses the fused LM-head
# loss, its (B, T, 151936) logits and their fp32 cross-entropy need about 130 GiB: then a smaller vocabulary.
VOCAB=151936
grep -q linear_cross_entropy cs336_systems/training/loss.py || VOCAB=32000
echo "== (b) bench step: 8b widths, 4 layers, ctx 32768, batch 2, vocab $VOCAB"
timeout 235 python3 -m cs336_systems.bench.step --preset 8b-32k --layers 4 --vocab $VOCAB --steps 3 --warmup 1 \
    --out-dir $W/step 2>&1 | grep -v "^W1202\|torch/_logging\|context_fn is passed\|in-place ops" | tee $W/step.log

echo "== (c) bench memory: xl, batch 4, ctx 2048"
timeout 55 python3 -m cs336_systems.bench.memory --preset xl --batch-size 4 --context-length 2048 \
    --group-sizes 1 2 3 4 6 8 12 --out-dir $W/memory 2>&1 | grep -v "^W1202\|torch/_logging\|context_fn" \
    | tail -n 30 | tee $W/memory.log

cp $W/step/step.md $W/step/step.json $W/step/step.png $W/memory/memory.md $W/memory/memory.json \
   $W/memory/memory_block.md "$OUT"/ 2>/dev/null
cat $W/tests.txt $W/step.log $W/memory.log > "$OUT"/log.txt
echo "== summary"
tail -n 3 $W/tests.txt
cat $W/step/step.md $W/memory/memory_block.md $W/memory/memory.md 2>/dev/null
