#!/usr/bin/env bash
# Run the torchrun restart test many times with every core busy, to expose races in the restart.
#
#     tools/stress_restart.sh [RUNS [HOGS]]     # defaults: RUNS=20, HOGS=$(nproc)
#     STRESS_CPUS=0 tools/stress_restart.sh 5   # also pin the test and the hogs to the CPUs listed (taskset -c)
#
# Starts HOGS busy-loop processes (`python -c 'while True: pass'`, killed on exit, whatever ends the
# script), then runs
#     pytest tests/training/test_train.py::test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint
# RUNS times, each in a fresh pytest. Prints one line per run ("run 3/20: passed in 95 s" or
# "run 3/20: FAILED in 95 s, kept in DIR"), then
#     restart test: P/RUNS passed under load (HOGS hogs on N cores)
# and exits 0 only if every run passed. A failing run keeps, in its own folder under
# $STRESS_LOG_DIR (default: a new folder under /tmp, printed first), pytest's output (pytest.log)
# and its --basetemp, in which the test leaves torchrun's whole stdout and stderr (torchrun.stdout,
# torchrun.stderr: the agent's log and every worker's output) next to the run's OUT_DIR; passing
# runs' folders are removed.
set -u
export PATH="$HOME/.local/bin:$PATH"  # uv, as .ci/run has it

runs=${1:-20}
hogs=${2:-$(nproc)}
cd "$(dirname "$0")/.."
log_dir=${STRESS_LOG_DIR:-$(mktemp -d /tmp/stress_restart.XXXXXX)}
mkdir -p "$log_dir"
pin=()
if [[ -n "${STRESS_CPUS:-}" ]]; then
    pin=(taskset -c "$STRESS_CPUS")
fi
echo "failing runs are kept in $log_dir"

hog_pids=()
test_pid=
cleanup() {
    # The pytest of an interrupted run (its torchrun, in a session of its own, ends within its run).
    [[ -n "$test_pid" ]] && kill "$test_pid" 2>/dev/null && wait "$test_pid" 2>/dev/null
    if ((${#hog_pids[@]})); then
        kill "${hog_pids[@]}" 2>/dev/null
        wait "${hog_pids[@]}" 2>/dev/null
    fi
    hog_pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # exit runs the EXIT trap
for ((i = 0; i < hogs; i++)); do
    "${pin[@]}" python3 -c 'while True: pass' &
    hog_pids+=($!)
done

test_id=tests/training/test_train.py::test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint
passed=0
for ((i = 1; i <= runs; i++)); do
    dir=$log_dir/run-$i
    mkdir -p "$dir"
    start=$SECONDS
    # In the background, so that a signal to this script is handled at once (bash defers traps
    # until a foreground child ends, but not while in `wait`).
    "${pin[@]}" uv run pytest -q -p no:cacheprovider --basetemp "$dir/tmp" "$test_id" >"$dir/pytest.log" 2>&1 &
    test_pid=$!
    wait "$test_pid"
    status=$?
    test_pid=
    if ((status == 0)); then
        passed=$((passed + 1))
        rm -rf "$dir"
        echo "run $i/$runs: passed in $((SECONDS - start)) s"
    else
        echo "run $i/$runs: FAILED in $((SECONDS - start)) s, kept in $dir"
    fi
done
echo "restart test: $passed/$runs passed under load ($hogs hogs on $(nproc) cores${STRESS_CPUS:+, pinned to CPUs $STRESS_CPUS})"
((passed == runs))
