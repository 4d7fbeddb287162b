#!/bin/bash
# Op-level forward / forward+backward at the shapes (Gluon vs tl vs cuDNN), and the backward at mid sizes.
export PYTHONPATH=. PYTHONUNBUFFERED=1
timeout 100 python3 .gpu/gluon_bwd.py bench 2>&1 | tail -4 | tee $OUT/bwd_mid.txt
timeout 300 python3 -m ops.flash_attn.gluon.gpu_check --skip-tests --timing-timeout 280 2>&1 | tail -16 | tee $OUT/timings.txt
