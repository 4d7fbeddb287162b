#!/bin/bash
# Final check: the whole CUDA suite by parts (pass counts), then the step with one more saved matmul.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
T="python3 -m pytest -m cuda -q -p no:cacheprovider"
timeout 120 $T tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -3 > $OUT/t_gluon.txt
timeout 60 $T tests/ops/flash_attn/test_flash_attention.py tests/ops/flash_attn/test_gluon_compile.py tests/ops/flash_attn/test_gluon_dispatch.py 2>&1 | tail -3 > $OUT/t_flash.txt
timeout 120 $T tests --ignore=tests/ops/flash_attn 2>&1 | tail -3 > $OUT/t_rest.txt
for f in t_gluon t_flash t_rest; do echo "$f: $(tail -1 $OUT/$f.txt)"; done
timeout 300 python3 -m cs336_systems bench step --preset 8b-32k --steps 2 --warmup 1 \
  --contenders ours@selective ours@selective:output_proj+k_proj --out-dir /tmp/step 2>&1 | grep -v "$F" | tail -25 > $OUT/step.log
cp /tmp/step/step.md /tmp/step/step.json $OUT/ 2>/dev/null; cat /tmp/step/step.md || tail -20 $OUT/step.log
