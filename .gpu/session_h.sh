#!/bin/bash
# Session h: GPU tests at this tree (by part), the step with layout-preserving attention, the profile.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
T="python3 -m pytest -m cuda -q -p no:cacheprovider -x"
timeout 170 $T tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -15 > $OUT/t_gluon.txt
timeout 70 $T tests/ops/flash_attn/test_flash_attention.py 2>&1 | tail -15 > $OUT/t_flash.txt
for f in t_gluon t_flash; do echo "$f: $(tail -1 $OUT/$f.txt)"; done
timeout 200 python3 -m cs336_systems bench step --preset 8b-32k --steps 2 --warmup 1 \
  --contenders ours@selective ours-sdpa@selective --out-dir /tmp/step 2>&1 | grep -v "$F" | tail -5
cp /tmp/step/step.md /tmp/step/step.json $OUT/ 2>/dev/null
timeout 90 $T tests --ignore=tests/ops/flash_attn 2>&1 | tail -3 > $OUT/t_rest.txt; echo "t_rest: $(tail -1 $OUT/t_rest.txt)"
timeout 100 python3 .gpu/step_profile.py 2 4 2>&1 | grep -v "$F" | tail -45 > $OUT/profile.txt; head -14 $OUT/profile.txt
