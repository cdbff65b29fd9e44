#!/usr/bin/env bash
# Re-runs RELIABILITY.md's table of disk and clock faults (as root: FUSE and iptables):
#   each of power-cut, power-cut-all, disk-error and clock alone, all of chatd-jepsen's
#   nemeses mixed, and the deliberately broken build (acks before the WAL sync) under
#   power-cut-all, which must be INVALID; with --long also the 30-minute run of every
#   nemesis (membership changes included). Prints the Markdown table at the end.
#   Re-run it when the write path changes.
#
#   jepsen/reliability.sh [--long]      (SECONDS_EACH=120, OUT=jepsen-runs/reliability-<time>)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/chatd-target}"
jepsen="$CARGO_TARGET_DIR/debug/chatd-jepsen"
[[ -x "$jepsen" ]] || { echo "build first: cargo build --workspace --bins" >&2; exit 2; }
out="${OUT:-jepsen-runs/reliability-$(date +%s)}"
each="${SECONDS_EACH:-120}"
mkdir -p "$out"
run() {
  echo "== chatd-jepsen test $*" >&2
  # A run's own verdict is in its results.json; the table shows it.
  "$jepsen" test --out "$out" "$@" | tail -n 1 || true
}
run --nemesis power-cut --time-limit "$each" --seed 11
run --nemesis power-cut-all --time-limit "$each" --seed 12
run --nemesis disk-error --time-limit "$each" --seed 13
run --nemesis clock --time-limit "$each" --seed 14
run --nemesis all --time-limit $(( each * 2 )) --seed 15
CHATD_TEST_ACK_BEFORE_SYNC=1 run --nemesis power-cut-all --time-limit 40 --seed 1
if [[ "${1:-}" == "--long" ]]; then
  run --nemesis all --time-limit 1800 --seed 20261201
fi
"$jepsen" table "$out"/*/
