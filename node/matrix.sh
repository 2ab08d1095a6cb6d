#!/bin/bash
# Owns: `make test-matrix`: runs the integration suite's core, limits, reaper and
# durability trials (and the harness's own, which check the containerd config) against
# each other containerd build that node/matrix-fetch.sh brings (Debian 13's 1.7.x, Debian
# unstable's 2.x), one full run per build, and prints which version each run used.
# Does not: fetch or install anything itself, or touch the system's containerd.
#
# Usage: node/matrix.sh [SUITE...]   (default: trixie sid; MATRIX_SKIP overrides the skipped)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${MATRIX_CACHE:-$repo/.cache/matrix}
suites=("$@"); [ ${#suites[@]} -gt 0 ] || suites=(trixie sid)
# The run keeps harness::, core:: (which holds the limits trials, core::memory_limit_by_size
# ...), reaper:: and durability::. libtest-mimic takes one filter only, so the other groups
# are skipped instead: one environment start per build, not one per group. The three-node
# trial (issue 17: balancing, not containerd) runs on the host only.
skip=()
for s in ${MATRIX_SKIP:-auth:: network:: operator:: durability::soak durability::three_nodes}; do skip+=(--skip "$s"); done
cargo=${CARGO:-cargo}

builds=$(bash "$here/matrix-fetch.sh" "$cache" "${suites[@]}") || { echo "matrix: fetching failed" >&2; exit 1; }
# Built once for every run.
(cd "$repo" && $cargo test --test integration --no-run -q) || exit 1

summary=(); failed=0
while read -r suite version dir; do
  echo "=== matrix: $suite containerd $version ($("$dir/containerd" --version)) with $(runc --version | head -1)"
  start=$(date +%s)
  # stdin is the list of builds this loop reads: the test run must not consume it.
  (cd "$repo" && ISOLATED_TEST_CONTAINERD=$dir $cargo test -q --test integration -- "${skip[@]}") < /dev/null 2>&1 | tee "$cache/last-$suite.log"
  rc=${PIPESTATUS[0]}
  secs=$(( $(date +%s) - start ))
  result=$(grep -E '^test result:' "$cache/last-$suite.log" | tail -1)
  summary+=("$suite containerd $version: ${result:-no result} (exit $rc, $secs s)")
  if [ "$rc" != 0 ]; then
    # Failed trials that node/KNOWN-GAPS.md lists for this build ("- expected failure:
    # `matrix-SUITE TRIAL`") stay failed in the count but do not fail the run; any other
    # failure, or a run with no result line, does.
    failures=$(sed -n '/^failures:$/,/^test result:/p' "$cache/last-$suite.log" | sed -n 's/^    \([a-z_0-9]*::[a-z_0-9:]*\)$/\1/p')
    [ -n "$result" ] && [ -n "$failures" ] || failed=1
    for f in $failures; do
      if grep -q "^- expected failure: \`matrix-$suite $f\`" "$here/KNOWN-GAPS.md"; then
        summary+=("  FAILED $f (expected, node/KNOWN-GAPS.md)")
      else
        summary+=("  FAILED $f"); failed=1
      fi
    done
  fi
done <<< "$builds"

echo "=== matrix summary"
printf '  %s\n' "${summary[@]}"
exit $failed
