#!/usr/bin/env bash
# Fuzzes one target with AFL++ (cargo-afl) for a bounded time:
#   fuzz/run.sh TARGET SECONDS
# TARGET is a binary of fuzz/src/bin (codec, snapshot_frame, client_frame, transport,
# config, e2e_entry); its seeds are fuzz/seeds/TARGET. FUZZ_EXECS=N also stops after about N
# executions; FUZZ_OUT=DIR keeps the findings there (default: a fresh directory under the
# target directory). Prints one summary line (executions, executions/s, corpus paths,
# crashes, hangs) and exits non-zero if AFL saved a crash or a hang.
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -ne 2 ]; then
  echo "usage: fuzz/run.sh TARGET SECONDS" >&2
  exit 2
fi
target=$1
seconds=$2
[ -d "seeds/$target" ] || { echo "no seeds for target $target (fuzz/seeds/$target)" >&2; exit 2; }

export CARGO_TARGET_DIR="${CHATD_FUZZ_TARGET_DIR:-$HOME/.cache/chatd-fuzz-target}"
cargo afl build --release --quiet --bin "$target"

out="${FUZZ_OUT:-$CARGO_TARGET_DIR/afl/$target}"
rm -rf "$out"
mkdir -p "$(dirname "$out")"

# No UI, no CPU binding (the cores are shared), no core_pattern requirement, and quiet
# about the CPU governor: a bounded, unattended run.
export AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 \
  AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
args=(-V "$seconds" -i "seeds/$target" -o "$out")
if [ -n "${FUZZ_EXECS:-}" ]; then
  args+=(-E "$FUZZ_EXECS")
fi
log="$out.log"
if ! cargo afl fuzz "${args[@]}" -- "$CARGO_TARGET_DIR/release/$target" >"$log" 2>&1; then
  echo "afl-fuzz failed for $target; its log:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi

stats="$out/default/fuzzer_stats"
stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
execs=$(stat execs_done)
run_time=$(stat run_time)
crashes=$(stat saved_crashes)
hangs=$(stat saved_hangs)
paths=$(stat corpus_count)
rate=$(awk -v e="$execs" -v t="$run_time" 'BEGIN { printf "%.0f", (t > 0 ? e / t : 0) }')
echo "fuzz $target: $execs execs in ${run_time}s ($rate execs/s), $paths paths, $crashes crashes, $hangs hangs"
if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
  echo "fuzz $target: findings in $out/default/crashes and $out/default/hangs:" >&2
  ls -l "$out/default/crashes" "$out/default/hangs" >&2 || true
  exit 1
fi
