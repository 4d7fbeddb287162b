#!/bin/bash
# Gluon backward dev check + timings, then the whole CUDA suite.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv,noheader
timeout 150 python3 .gpu/gluon_bwd.py check 2>&1 | tail -40 | tee $OUT/check.txt
timeout 150 python3 .gpu/gluon_bwd.py bench 2>&1 | tail -8 | tee $OUT/bench.txt
timeout 270 python3 -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tail -15 > $OUT/tests.txt
echo "== tests"; tail -4 $OUT/tests.txt; git log --oneline -1
