#!/usr/bin/env bash
# Idle cost of partitions (issue 12): a 3-node cluster of real chatd processes on loopback
# with PARTITIONS partitions (R=3: every node holds a replica of each), no clients, no
# traffic. Waits until every node is ready (and, unless --no-quiesce, until every group is
# quiesced), then reads each node's CPU time (/proc/PID/stat) over SECONDS and its RSS.
#
#   bench/idle-partitions.sh PARTITIONS [SECONDS] [--no-quiesce]
#
# CHATD_BIN picks the binary (default: $CARGO_TARGET_DIR/debug/chatd, or target/debug/chatd).
# LIVENESS_PING_MS / LIVENESS_TIMEOUT_MS override the nodes' [raft] liveness knobs (to
# weigh their cost against the defaults in one sitting).
# Everything it starts is stopped by PID and its directory removed on exit.
set -euo pipefail

partitions=${1:?usage: $0 PARTITIONS [SECONDS] [--no-quiesce]}
seconds=${2:-30}
quiesce=1
[[ "${3:-}" == "--no-quiesce" || "${2:-}" == "--no-quiesce" ]] && quiesce=0
[[ "${2:-}" == "--no-quiesce" ]] && seconds=30
bin=${CHATD_BIN:-${CARGO_TARGET_DIR:-target}/debug/chatd}
[[ -x "$bin" ]] || { echo "no chatd binary at $bin (set CHATD_BIN)" >&2; exit 2; }
ready_wait_s=$((120 + partitions / 10))

dir=$(mktemp -d /tmp/chatd-idle.XXXXXX)
port=$((20000 + (RANDOM % 400) * 100))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap cleanup EXIT

"$bin" cluster init --nodes 3 --partitions "$partitions" --base-port "$port" --out "$dir/c" >/dev/null
if [[ $quiesce == 0 ]]; then
  sed -i 's/^quiesce_idle_ms = .*/quiesce_idle_ms = 0/' "$dir"/c/node-*/chatd.toml
fi
if [[ -n "${LIVENESS_PING_MS:-}" ]]; then
  sed -i "s/^liveness_ping_ms = .*/liveness_ping_ms = $LIVENESS_PING_MS/" "$dir"/c/node-*/chatd.toml
fi
if [[ -n "${LIVENESS_TIMEOUT_MS:-}" ]]; then
  sed -i "s/^liveness_timeout_ms = .*/liveness_timeout_ms = $LIVENESS_TIMEOUT_MS/" "$dir"/c/node-*/chatd.toml
fi
for i in 1 2 3; do
  "$bin" run --config "$dir/c/node-$i/chatd.toml" 2>"$dir/node-$i.log" >/dev/null &
  pids+=($!)
done

metric() { # node-index name
  curl -fsS "http://127.0.0.1:$((port + 10 * ($1 - 1)))/metrics" 2>/dev/null |
    awk -v n="$2" '$1 == n { print $2 }'
}
started=$(date +%s)
for i in 1 2 3; do
  until curl -fsS "http://127.0.0.1:$((port + 10 * (i - 1)))/readyz" >/dev/null 2>&1; do
    (( $(date +%s) - started < ready_wait_s )) || { echo "node $i not ready" >&2; tail -5 "$dir/node-$i.log" >&2; exit 1; }
    sleep 0.5
  done
done
echo "ready after $(( $(date +%s) - started )) s"
if [[ $quiesce == 1 ]]; then
  for i in 1 2 3; do
    until [[ "$(metric "$i" chatd_raft_groups_quiesced)" == "$(metric "$i" chatd_raft_groups)" ]]; do
      (( $(date +%s) - started < ready_wait_s + 60 )) || {
        echo "node $i: $(metric "$i" chatd_raft_groups_quiesced) of $(metric "$i" chatd_raft_groups) groups quiesced" >&2; exit 1; }
      sleep 0.5
    done
  done
  echo "all groups quiesced after $(( $(date +%s) - started )) s"
else
  sleep 5
fi

ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
declare -a before rpcs0
for i in 0 1 2; do before[$i]=$(ticks "${pids[$i]}"); rpcs0[$i]=$(metric $((i + 1)) chatd_raft_peer_rpcs_total); done
sleep "$seconds"
printf '%-6s %8s %10s %10s %12s %10s\n' node groups quiesced "cpu %" "rss MiB" "rpcs/s"
for i in 0 1 2; do
  after=$(ticks "${pids[$i]}")
  rss_kb=$(awk '/VmRSS/ { print $2 }' "/proc/${pids[$i]}/status")
  rpcs1=$(metric $((i + 1)) chatd_raft_peer_rpcs_total)
  awk -v n=$((i + 1)) -v g="$(metric $((i + 1)) chatd_raft_groups)" -v q="$(metric $((i + 1)) chatd_raft_groups_quiesced)" \
      -v d=$((after - before[i])) -v hz="$hz" -v s="$seconds" -v rss="$rss_kb" -v r=$((rpcs1 - rpcs0[i])) \
      'BEGIN { printf "%-6s %8d %10d %10.2f %12.1f %10.1f\n", n, g, q, 100 * d / hz / s, rss / 1024, r / s }'
done
