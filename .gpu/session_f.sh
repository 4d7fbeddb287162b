#!/bin/bash
# dK from registers: correctness and an interleaved A/B at the 8B shape, then the Gluon CUDA tests.
pip install --target /tmp/site .whl/*.whl -q --no-deps 2>&1 | grep -v WARNING | tail -1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
timeout 100 python3 .gpu/gluon_bwd.py dkr 2>&1 | grep -v Warning | tail -20 > $OUT/dkr.txt
grep '"ok": false\|DKR\|shape=' $OUT/dkr.txt | cut -c1-400
timeout 140 python3 -m pytest -m cuda -q -p no:cacheprovider tests/ops/flash_attn/test_gluon_cuda.py 2>&1 | tail -3 > $OUT/t_gluon.txt
tail -1 $OUT/t_gluon.txt
