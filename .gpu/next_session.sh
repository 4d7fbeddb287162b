#!/bin/bash
# For the next session's first device call (about 8 min): the CUDA suite by parts with the current
# defaults, the dQ-swizzle A/B, the 8B attention layer side by side, then the step.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
T="python3 -m pytest -m cuda -q -p no:cacheprovider"
timeout 150 $T tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -3 > $OUT/t_gluon.txt
timeout 60 $T tests/ops/flash_attn/test_flash_attention.py 2>&1 | tail -3 > $OUT/t_flash.txt
timeout 90 $T tests --ignore=tests/ops/flash_attn 2>&1 | tail -3 > $OUT/t_rest.txt
for f in t_gluon t_flash t_rest; do echo "$f: $(tail -1 $OUT/$f.txt)"; done
timeout 90 python3 .gpu/gluon_bwd.py dqsw 2>&1 | grep "CHECKS\|shape=\|false" | cut -c1-400 | tee $OUT/dqsw.txt
timeout 60 python3 -m cs336_systems bench attention --preset 8b --impls ours sdpa-cudnn --passes forward backward \
  forward+backward --out-dir /tmp/att 2>&1 | tail -3; cp /tmp/att/attention.md $OUT/ 2>/dev/null
timeout 200 python3 -m cs336_systems bench step --preset 8b-32k --steps 2 --warmup 1 \
  --contenders ours@selective ours-sdpa@selective --out-dir /tmp/step 2>&1 | grep -v "$F" | tail -8
cp /tmp/step/step.md /tmp/step/step.json $OUT/ 2>/dev/null
