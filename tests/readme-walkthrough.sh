#!/usr/bin/env bash
# The README's first steps, taken as a newcomer takes them: clone this repository (its
# committed HEAD) into a temp dir, run the clone's `./dev run` (build, then a single-node
# chatd on 127.0.0.1:7000), then run the README's block between `<!-- walkthrough:begin -->`
# and `<!-- walkthrough:end -->` line by line in the clone, exactly as written, failing on
# the first line that fails; then check what those lines did. Cleans up after itself: the
# node (and a build still running) by process group, the clone.
#
#   tests/readme-walkthrough.sh        (./dev test runs it after the test suite)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/chatd-target}"
API=127.0.0.1:7000
# Build and first start: the clone's workspace crates compile again (a few minutes warm;
# a cold machine also compiles RocksDB).
READY_S_MAX=2400
# The README's block and the checks after it.
STEPS_S_MAX=300
STOP_S_MAX=30

started=$(date +%s)
work=$(mktemp -d /tmp/chatd-readme.XXXXXX)
pid=""
# The clone's build replaces the binaries in $CARGO_TARGET_DIR/debug with its own (cargo
# does not put this checkout's back while they are up to date): keep them (hard links) and
# put them back at the end, so later runs from this checkout use what it built.
bins="$CARGO_TARGET_DIR/debug"
mkdir -p "$work/bins"
find "$bins" -maxdepth 1 -type f -executable -exec ln {} "$work/bins/" \;
restore_bins() {
  for f in "$work/bins"/*; do
    [ -e "$f" ] || continue
    ln -f "$f" "$bins/.restore.$$" && mv -f "$bins/.restore.$$" "$bins/$(basename "$f")"
  done
}
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 $((STOP_S_MAX * 10))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  restore_bins
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "readme-walkthrough: FAILED: $*" >&2
  echo "--- ./dev run output (last 40 lines) ---" >&2
  tail -n 40 "$work/run.log" >&2 || true
  exit 1
}

if curl -s -o /dev/null --max-time 2 "http://$API/healthz"; then
  echo "readme-walkthrough: something already listens on $API; stop it first" >&2
  exit 1
fi
git clone -q "$repo" "$work/chatd"
cd "$work/chatd"

# The README's first command, in its own process group (setsid) so cleanup reaches the
# build or the node it becomes.
setsid ./dev run >"$work/run.log" 2>&1 &
pid=$!
deadline=$(( $(date +%s) + READY_S_MAX ))
until curl -sf -o /dev/null --max-time 2 "http://$API/readyz"; do
  kill -0 "$pid" 2>/dev/null || fail "./dev run exited before the node was ready"
  [ "$(date +%s)" -lt "$deadline" ] || fail "the node was not ready after ${READY_S_MAX} s"
  sleep 1
done
echo "readme-walkthrough: ./dev run built and started a node in $(( $(date +%s) - started )) s" >&2

# What chatd printed at its first start: the admin token's place and the next steps.
grep -q "The admin token is in $work/chatd/chatd-data/admin.token" "$work/run.log" ||
  fail "the first start did not say where the admin token is"
grep -q 'alice=$(./dev cli admin users add alice)' "$work/run.log" ||
  fail "the first start did not print the next steps"

# The README's block, each line echoed, in one shell (lines set variables for later ones).
block=$(awk '/<!-- walkthrough:begin -->/{on=1; next} /<!-- walkthrough:end -->/{on=0} on' README.md |
  grep -v '^```')
[ -n "$block" ] || fail "README.md has no walkthrough block"
{
  echo 'set -euo pipefail'
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    printf 'echo %q >&2\n' "\$ $line"
    printf '%s\n' "$line"
  done <<<"$block"
  # What those lines must have done.
  cat <<'CHECKS'
echo "readme-walkthrough: checking what the README's lines did" >&2
CHATD_TOKEN=$bob ./dev cli history d:alice:bob | grep -q "hi bob" || { echo "bob does not see alice's first message" >&2; exit 1; }
CHATD_TOKEN=$alice ./dev cli history d:alice:bob | grep -q "hi alice" || { echo "alice does not see bob's answer" >&2; exit 1; }
CHATD_TOKEN=$bob ./dev cli --json sync | grep -q '"d:alice:bob"' || { echo "bob's chat list lacks d:alice:bob" >&2; exit 1; }
CHATD_TOKEN=$alice ./dev cli history "$team" | grep -q "hello team" || { echo "alice does not see carol's group message" >&2; exit 1; }
CHECKS
} >"$work/steps.sh"
timeout "$STEPS_S_MAX" bash "$work/steps.sh" || fail "a README step failed (the last line echoed above)"
echo "readme-walkthrough: every README step worked as written ($(( $(date +%s) - started )) s in all)" >&2
