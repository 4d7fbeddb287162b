#!/bin/bash
# For the next session's first device call (about 10 min): what this session could not measure.
#  1. `bench step --profile` at 2 and 4 layers for ours and ours-sdpa: the CLI's categories on the GPU,
#     and cuDNN's in-step attention time (is the 7-11 % in-step slowdown of our kernels the clock?),
#     with the SM clock and power sampled alongside.
#  2. The CS336 leaderboard timing (session j's timed out at 100 s).
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
# 0. The Gluon tests at this tree (3ba1cbf and e857191 were not GPU-run in the session that made them).
timeout -s INT 200 python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -1
F="^W1202\|torch/_logging\|context_fn is passed\|in-place ops"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv -lms 500 > $OUT/clocks.csv &
SMI=$!
for L in 2 4; do
  timeout 150 python3 -m cs336_systems bench step --preset 8b-32k --layers $L --steps 2 --warmup 1 --profile \
    --contenders ours ours-sdpa --out-dir /tmp/prof$L 2>&1 | grep -v "$F" | tail -12
  cp /tmp/prof$L/step.md $OUT/profile_L$L.md 2>/dev/null
done
kill $SMI
timeout 200 python3 -m cs336_systems bench attention --leaderboard --out-dir /tmp/lb 2>&1 | tail -4
cp /tmp/lb/*.md $OUT/ 2>/dev/null
sort -t, -k2 -n $OUT/clocks.csv | awk -F, 'NR>1{print $2}' | uniq -c | sort -rn | head -5
