#!/usr/bin/env bash
# The check to run on a CUDA machine before trusting or publishing GPU numbers: the CUDA tests, then the
# standard benchmarks, each part under its own time limit, so one hung part does not take the rest with it.
#
#     bash tools/gpu_check.sh [OUT_DIR]        # from the repository root; OUT_DIR: default $OUT, else outputs/gpu_check
#     PARTS="tests leaderboard" bash tools/gpu_check.sh      # only some parts
#
# Parts, in order (PARTS picks and orders them):
#   tests        pytest -m cuda: the Gluon tests, the other flash-attention tests, then the rest of tests/ (in
#                parallel processes where pytest-xdist is installed: see workers())
#   attention    bench attention --preset 8b --impls ours sdpa-cudnn: the 8B model's attention layer
#   leaderboard  bench attention --leaderboard: the CS336 leaderboard shape, ours vs SDPA
#   profile      bench step --profile at 2 and 4 layers, ours and ours-sdpa: kernel time by category
#                (the difference of the two tables, halved, is one layer's share)
#   step         bench step: the CS336 2026 leaderboard step, ours@selective vs stock vs ours-sdpa@selective
#   gluon        (not in the default list) tools/gluon_timings.py: the Gluon kernels vs tl and cuDNN, op level
#   gqa          (not in the default list) bench attention --kv-heads 8: Hq 32 / Hkv 8, D 128, N 4096-32768,
#                ours vs SDPA (enable_gqa) and FlexAttention
#   documents    (not in the default list) bench attention --documents: 32768-token rows of documents with mean
#                length 512-8192, ours vs FlexAttention's document mask and SDPA's dense mask
#   plans        (not in the default list) bench step: the memory-budgeted plan (ours@auto) beside ours@selective
#                and stock, each row with its peak (or where it ran out of memory and the allocator's message)
#   dispatch     (not in the default list) bench attention --dispatch-sweep: ours (the dispatch rule) vs the tl
#                kernels alone, the Gluon kernels wherever they run, and cuDNN; N 512-32768, D 64/128, BH 1-64,
#                causal and not; writes the dispatch table and the ours/cuDNN plot
#
# Prints the GPU and the git revision, each test part's pytest summary line and each benchmark's markdown
# table; writes OUT_DIR/<part>.log (the full output) and each benchmark's md/json/png under OUT_DIR/<part>/.
# Exits non-zero if any part failed or ran out of time. Runs `python3` with the repository on PYTHONPATH
# (PYTHON="uv run python" to use the uv environment). Time limits (seconds) are TIME_<PART> variables.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-outputs/gpu_check}}
PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-tests attention leaderboard profile step}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
NOISE="^W[0-9]\{4\} \|torch/_logging\|context_fn is passed\|in-place ops"
failed=()

# run NAME SECONDS CMD...: the command under a time limit (SIGINT first, so pytest still prints its summary),
# its output to OUT_DIR/NAME.log; a non-zero status (124: out of time) marks the part failed.
run() {
    local name=$1 limit=$2
    shift 2
    timeout -s INT -k 30 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then failed+=("$name (exit $rc)"); fi
    return $rc
}

# pytest-xdist workers for the CUDA tests, where it is installed: one per 18 GiB of the card, at most 8 (the
# float64 oracles of the 4113-token cases take several GiB each: 8 workers ran an 80 GB H100 out of memory,
# 3 and 4 did not; 8 fit an H200's 141 GB); none without xdist.
workers() {
    $PYTHON -c "import xdist" 2>/dev/null || return 0
    $PYTHON -c "import torch; print(f'-n {max(1, min(8, torch.cuda.mem_get_info()[1] // (18 * 2**30)))}')"
}

tests() {
    local pytest=($PYTHON -m pytest -m cuda -q -p no:cacheprovider $(workers))
    local gluon=tests/ops/flash_attn/test_gluon_cuda.py
    run tests_gluon "${TIME_TESTS_GLUON:-300}" "${pytest[@]}" "$gluon"
    run tests_flash "${TIME_TESTS_FLASH:-300}" "${pytest[@]}" tests/ops/flash_attn --ignore="$gluon"
    run tests_rest "${TIME_TESTS_REST:-300}" "${pytest[@]}" tests --ignore=tests/ops/flash_attn
    for part in tests_gluon tests_flash tests_rest; do echo "$part: $(tail -n 1 "$OUT_DIR/$part.log")"; done
}

# bench NAME SECONDS ARGS...: `python -m cs336_systems bench ARGS --out-dir OUT_DIR/NAME`, then its tables.
bench() {
    local name=$1 limit=$2
    shift 2
    run "$name" "$limit" $PYTHON -m cs336_systems bench "$@" --out-dir "$OUT_DIR/$name" \
        || grep -v "$NOISE" "$OUT_DIR/$name.log" | tail -n 15
    cat "$OUT_DIR/$name"/*.md 2>/dev/null
}

attention() { bench attention "${TIME_ATTENTION:-120}" attention --preset 8b --impls ours sdpa-cudnn; }
leaderboard() { bench leaderboard "${TIME_LEADERBOARD:-200}" attention --leaderboard; }
profile() {
    for layers in 2 4; do
        bench "profile_L$layers" "${TIME_PROFILE:-200}" step --layers "$layers" --steps 2 --warmup 1 --profile \
            --contenders ours ours-sdpa
    done
}
gluon() {
    run gluon "${TIME_GLUON:-300}" $PYTHON -m tools.gluon_timings --timeout "$((${TIME_GLUON:-300} - 30))"
    tail -n 14 "$OUT_DIR/gluon.log"
}
# do_bench times for the comparisons of the issues' targets: long enough that every contender runs at the
# card's steady clock under its power limit (reached within a few hundred ms of load), as in training,
# not at whatever boost clock one or two calls of a long shape happen to get.
STEADY="--warmup-ms 1000 --rep-ms 2000"
gqa() {
    bench gqa "${TIME_GQA:-300}" attention --kv-heads 8 --heads 32 --batch 1 --head-dims 128 --dtypes bf16 \
        --seq-lens 4096 8192 16384 32768 --passes forward forward+backward --impls ours sdpa-cudnn sdpa-flash flex \
        $STEADY
}
documents() {
    bench documents "${TIME_DOCUMENTS:-360}" attention --documents 512 1024 2048 4096 8192 --heads 16 --batch 1 \
        --head-dims 128 --dtypes bf16 --seq-lens 32768 --passes forward forward+backward \
        --impls ours flex sdpa-cudnn sdpa-efficient $STEADY
}
plans() {
    bench plans "${TIME_PLANS:-480}" step --steps 2 --warmup 1 --contenders ours@auto ours@selective stock
}
dispatch() {  # prints the dispatch table and its summary; every timing is in OUT_DIR/dispatch/attention.md
    run dispatch "${TIME_DISPATCH:-540}" $PYTHON -m cs336_systems bench attention --dispatch-sweep \
        --out-dir "$OUT_DIR/dispatch" || grep -v "$NOISE" "$OUT_DIR/dispatch.log" | tail -n 15
    cat "$OUT_DIR/dispatch/attention_dispatch.md" 2>/dev/null
}
step() {
    bench step "${TIME_STEP:-400}" step --steps 3 --warmup 1 --contenders ours@selective stock ours-sdpa@selective
}

for part in $PARTS; do
    case $part in
        tests | attention | leaderboard | profile | step | gluon | gqa | documents | plans | dispatch) ;;
        *) echo "unknown part $part (choose from tests attention leaderboard profile step gluon gqa documents plans" \
                "dispatch)" >&2
           exit 2 ;;
    esac
done
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
echo "git ${CS336_GIT_REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(date -u +%FT%TZ), results in $OUT_DIR"
for part in $PARTS; do
    echo "== $part"
    "$part"
done
if [ ${#failed[@]} -ne 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all parts passed"
