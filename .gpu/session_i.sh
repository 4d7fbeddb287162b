#!/bin/bash
# Session i (final): the GPU tests at this tree by part (SIGINT at the limit, so pytest still prints
# its summary), then the 8B attention layer side by side.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
T="python3 -m pytest -m cuda -q -p no:cacheprovider"
timeout -s INT 300 $T tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -4 > $OUT/t_gluon.txt
timeout -s INT 120 $T tests/ops/flash_attn/test_flash_attention.py 2>&1 | tail -4 > $OUT/t_flash.txt
for f in t_gluon t_flash; do echo "$f: $(tail -1 $OUT/$f.txt)"; done
timeout 70 python3 -m cs336_systems bench attention --preset 8b --impls ours sdpa-cudnn --passes forward backward \
  forward+backward --out-dir /tmp/att 2>&1 | tail -1; cp /tmp/att/attention.md $OUT/ 2>/dev/null; tail -6 /tmp/att/attention.md
