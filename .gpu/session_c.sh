#!/bin/bash
# Gluon CUDA tests (pass counts), the 8B leaderboard step side by side, then the flash CUDA tests.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
timeout 150 python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -5 > $OUT/tests_gluon.txt
tail -2 $OUT/tests_gluon.txt
timeout 270 python3 -m cs336_systems bench step --preset 8b-32k --steps 2 --warmup 1 \
  --contenders ours@selective stock ours-sdpa@selective --out-dir /tmp/step 2>&1 | grep -v "$F" | tail -25 > $OUT/step.log
cp /tmp/step/step.md /tmp/step/step.json /tmp/step/step.png $OUT/ 2>/dev/null; cat /tmp/step/step.md
timeout 150 python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops/flash_attn/test_flash_attention.py 2>&1 | tail -5 > $OUT/tests_flash.txt
echo "== tests"; tail -2 $OUT/tests_gluon.txt; tail -2 $OUT/tests_flash.txt
