#!/usr/bin/env bash
# Run pytest beside a CPU hog: one busy loop that keeps a core saturated for the whole run, killed
# when this script exits however it exits.  The suite must not depend on an idle machine.
#
#   bash .ci/under_load.sh [pytest args...]          (default: the whole suite)
#   HOGS=2 bash .ci/under_load.sh tests/test_chaos.py (more busy loops)
#
# Prints the pytest summary and the wall time; exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."

HOGS=${HOGS:-1}
PY=${PYTHON:-python}
hogs=()
stop_hogs() {
  for pid in "${hogs[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${hogs[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap stop_hogs EXIT INT TERM

for _ in $(seq "$HOGS"); do
  sh -c 'while :; do :; done' &
  hogs+=("$!")
done
echo "under load: ${#hogs[@]} busy loop(s) (pids ${hogs[*]}); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

start=$(date +%s%N)
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
tenths=$((($(date +%s%N) - start) / 100000000))
printf 'pytest exit %d; wall time %d.%d s (load average %s)\n' "$rc" $((tenths / 10)) $((tenths % 10)) \
  "$(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"
