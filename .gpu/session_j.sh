#!/bin/bash
# Session j: test_flash_attention.py -m cuda whole (session i stopped it at 120 s in a cold Triton
# compile), then the CS336 leaderboard timing.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
timeout -s INT 300 python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops/flash_attn/test_flash_attention.py \
  2>&1 | tail -4 > $OUT/t_flash.txt; echo "t_flash: $(tail -1 $OUT/t_flash.txt)"
timeout 100 python3 -m cs336_systems bench attention --leaderboard --out-dir /tmp/lb 2>&1 | tail -1
cp /tmp/lb/*.md $OUT/ 2>/dev/null; tail -8 /tmp/lb/*.md
