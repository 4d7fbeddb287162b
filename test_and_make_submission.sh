#!/usr/bin/env bash
# Run the test suite, keep its results, and zip the code for submission (as in the CS336 repository).
#
#   ./test_and_make_submission.sh                  # all tests, then the zip
#   ./test_and_make_submission.sh -m "not slow"    # extra arguments go to pytest
#   SKIP_TESTS=1 ./test_and_make_submission.sh     # zip only (test_results/ from an earlier run, if any)
#   SUBMISSION_ZIP=other.zip ./test_and_make_submission.sh
#
# Test results go to test_results/ (junit XML + the pytest log). A failing test does not stop the
# submission: the results record it, and the script's exit status is pytest's.
#
# The zip holds what git would commit (tracked files and new files .gitignore does not exclude, so
# no .venv, caches, outputs/, runs/ or zips), minus hidden entries (.git, editor and CI settings),
# data/ and checkpoint or snapshot files, plus test_results/.
set -euo pipefail
cd "$(dirname "$0")"

output_file="${SUBMISSION_ZIP:-cs336-spring2025-assignment-2-submission.zip}"
results_dir=test_results
status=0

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    rm -rf "$results_dir"
    mkdir -p "$results_dir"
    uv run pytest -v --junitxml="$results_dir/test_results.xml" "$@" 2>&1 | tee "$results_dir/pytest.log" \
        || status=$?
    echo "pytest exited with status $status; results in $results_dir/"
fi

if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "error: not a git checkout: the file list comes from git ls-files" >&2
    exit 2
fi

files=()
while IFS= read -r -d '' file; do
    [[ -f "$file" ]] || continue  # tracked but deleted in the working tree
    case "$file" in
        .* | data/* | *.pt | *.pth | *.ckpt | *.pickle | *.pkl) continue ;;
    esac
    files+=("$file")
done < <(git ls-files --cached --others --exclude-standard -z)
if [[ -d "$results_dir" ]]; then
    files+=("$results_dir")
fi

rm -f "$output_file"
zip -q -r "$output_file" "${files[@]}" -x '*__pycache__*' '*.pyc'
echo "wrote $output_file: $(unzip -Z1 "$output_file" | wc -l) files, $(du -h "$output_file" | cut -f1)"
exit "$status"
