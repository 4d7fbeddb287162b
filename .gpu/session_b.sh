#!/bin/bash
# Gluon backward: dev check + variant timings, then the Gluon and flash CUDA tests, then the rest.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
timeout 120 python3 .gpu/gluon_bwd.py check 2>&1 | grep -v Warning | tail -40 > $OUT/check.txt; grep -c '"ok": true' $OUT/check.txt; grep '"ok": false\|Error\|ALL' $OUT/check.txt | cut -c1-300
timeout 120 python3 .gpu/gluon_bwd.py bench 2>&1 | tail -3 | tee $OUT/bench.txt
timeout 170 python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops/flash_attn 2>&1 | tail -15 > $OUT/tests_flash.txt
timeout 170 python3 -m pytest -m cuda -q -p no:cacheprovider tests --ignore=tests/ops/flash_attn 2>&1 | tail -15 > $OUT/tests_rest.txt
echo "== tests"; tail -3 $OUT/tests_flash.txt; tail -3 $OUT/tests_rest.txt; git log --oneline -1
