#!/usr/bin/env bash
# CI-sized fuzzing: builds every target with cargo-afl and runs each for FUZZ_SECONDS
# (default 20) from its seeds; fails if AFL finds a crash or a hang in any. Prints one line
# per target: executions, executions/s, corpus paths, crashes, hangs.
#
# Tools: cargo-afl (crates.io) builds AFL++ 4.40c and its runtime from source when it is
# installed; that needs make and a C compiler. Debian's afl++ package (4.04c) cannot drive
# binaries built against that runtime (its fork server protocol is older), so the afl-fuzz
# used is cargo-afl's own (`cargo afl fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
CARGO_AFL_VERSION=0.18.2

if ! command -v make >/dev/null || ! command -v cc >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make gcc >/dev/null
fi
if ! cargo afl --version 2>/dev/null | grep -q "cargo-afl $CARGO_AFL_VERSION"; then
  echo "installing cargo-afl $CARGO_AFL_VERSION (builds AFL++)"
  cargo install cargo-afl --locked --version "$CARGO_AFL_VERSION" --quiet
fi
# The AFL runtime is built per rustc version: build it if this rustc has none yet.
if ! cargo afl build --help >/dev/null 2>&1; then
  cargo afl config --build
fi

export CARGO_TARGET_DIR="${CHATD_FUZZ_TARGET_DIR:-$HOME/.cache/chatd-fuzz-target}"
cargo afl build --release --quiet

targets=(codec snapshot_frame client_frame transport config e2e_entry)
failed=()
for t in "${targets[@]}"; do
  if ! ./run.sh "$t" "$seconds"; then
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzzing found crashes or hangs in: ${failed[*]}" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets, no crash, no hang"
