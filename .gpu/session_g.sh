#!/bin/bash
# Session g, call 1 (~8 min): dQ-swizzle A/B, attention layer side by side, the step profile
# (2 and 4 layers), then the full step at HEAD.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
timeout 100 python3 .gpu/gluon_bwd.py dqsw 2>&1 | grep "CHECKS\|shape=\|false\|Error" | cut -c1-400 | tee $OUT/dqsw.txt
timeout 80 python3 -m cs336_systems bench attention --preset 8b --impls ours sdpa-cudnn --passes forward backward \
  forward+backward --out-dir /tmp/att 2>&1 | tail -2; cp /tmp/att/attention.md $OUT/ 2>/dev/null; cat /tmp/att/attention.md | tail -8
timeout 150 python3 .gpu/step_profile.py 2 4 2>&1 | grep -v "$F" | tail -45 | tee $OUT/profile.txt
timeout 200 python3 -m cs336_systems bench step --preset 8b-32k --steps 2 --warmup 1 \
  --contenders ours@selective ours-sdpa@selective --out-dir /tmp/step 2>&1 | grep -v "$F" | tail -6
cp /tmp/step/step.md /tmp/step/step.json $OUT/ 2>/dev/null
