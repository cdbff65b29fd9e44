#!/usr/bin/env bash
# The message path (issue 13): a fresh 3-node cluster of real chatd processes on loopback
# (fsync on) per workload, one `chat-cli bench` client connected to node 1 only (as the
# NATS JetStream comparison in the issue: one client on node 1), 1 KiB messages.
#
#   bench/message-path.sh [WORKLOAD ...]       (default: all, in this order)
#
#   seq1       sequential send -> ack into one chat (one connection sends, 1 in flight)
#   inflight1  one connection, one chat, 256 in flight
#   seq64      sequential, one connection over 64 chats
#   inflight64 one connection, 64 chats, 256 in flight
#   rate1      1,000 msg/s into one chat, 1 recipient connection (+ the sender's own)
#   rate8      1,000 msg/s into one chat, 8 recipient connections (+ the sender's own)
#   max64      chat-cli bench (b): 64 connections over the nodes, 64 chats, 256 in flight
#   hot16      one group of 16 members on all three nodes, every member sending, 512 in
#              flight: the limit of one hot chat (16 deliveries per message)
#
# PARTITIONS (default 64), BENCH_SECONDS (measured, default 15), WARMUP (default 2), CHATD_BIN,
# CHAT_CLI (default: $CARGO_TARGET_DIR/debug/…). PERF=1 records `perf record -g` of node 1
# during each workload into $PERF_DIR (default /tmp/chatd-perf); PERF_CG replaces `-g` (e.g.
# PERF_CG="--call-graph dwarf,16384" for whole Rust stacks). Each workload's report is
# printed; every process it starts is stopped by PID and its directory removed on exit.
set -euo pipefail

target=${CARGO_TARGET_DIR:-target}
bin=${CHATD_BIN:-$target/debug/chatd}
cli=${CHAT_CLI:-$target/debug/chat-cli}
partitions=${PARTITIONS:-64}
seconds=${BENCH_SECONDS:-15}
warmup=${WARMUP:-2}
[[ -x "$bin" && -x "$cli" ]] || { echo "no binaries at $bin / $cli (set CHATD_BIN, CHAT_CLI)" >&2; exit 2; }
workloads=("$@")
[[ ${#workloads[@]} -gt 0 ]] || workloads=(seq1 inflight1 seq64 inflight64 rate1 rate8 max64)

dir=$(mktemp -d /tmp/chatd-msgpath.XXXXXX)
pids=()
stop_nodes() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  pids=()
}
cleanup() { stop_nodes; if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi; }
trap cleanup EXIT

args_of() {
  case "$1" in
    seq1) echo "--connections 2 --chats 1 --senders 1 --rate 0 --in-flight 1" ;;
    inflight1) echo "--connections 2 --chats 1 --senders 1 --rate 0 --in-flight 256" ;;
    seq64) echo "--connections 2 --chats 64 --group-size 2 --senders 1 --rate 0 --in-flight 1" ;;
    inflight64) echo "--connections 2 --chats 64 --group-size 2 --senders 1 --rate 0 --in-flight 256" ;;
    rate1) echo "--connections 2 --chats 1 --senders 1 --rate 1000" ;;
    rate8) echo "--connections 9 --chats 1 --group-size 9 --senders 1 --rate 1000" ;;
    max64) echo "--connections 64 --chats 64 --rate 0 --in-flight 256 --spread" ;;
    hot16) echo "--connections 16 --chats 1 --group-size 16 --rate 0 --in-flight 512 --spread" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
  esac
}

for w in "${workloads[@]}"; do
  a=$(args_of "$w")
  rm -rf "$dir/c"
  port=$((20000 + (RANDOM % 400) * 100))
  "$bin" cluster init --nodes 3 --partitions "$partitions" --base-port "$port" \
    --send-rate-per-sec 1000000 --out "$dir/c" >/dev/null
  for i in 1 2 3; do
    "$bin" run --config "$dir/c/node-$i/chatd.toml" 2>>"$dir/node-$i.log" >/dev/null &
    pids+=($!)
  done
  started=$(date +%s)
  for i in 1 2 3; do
    until curl -fsS "http://127.0.0.1:$((port + 10 * (i - 1)))/readyz" >/dev/null 2>&1; do
      (( $(date +%s) - started < 120 )) || { echo "node $i not ready" >&2; tail -5 "$dir/node-$i.log" >&2; exit 1; }
      sleep 0.3
    done
  done
  nodes="127.0.0.1:$port"
  if [[ "$a" == *--spread* ]]; then
    a=${a/--spread/}
    nodes="127.0.0.1:$port,127.0.0.1:$((port + 10)),127.0.0.1:$((port + 20))"
  fi
  perf_pid=""
  if [[ "${PERF:-0}" == 1 ]]; then
    mkdir -p "${PERF_DIR:-/tmp/chatd-perf}"
    ( sleep "$((warmup + 3))"; exec perf record ${PERF_CG:--g} -F 999 -p "${pids[0]}" \
        -o "${PERF_DIR:-/tmp/chatd-perf}/$w.data" -- sleep "$((seconds - 4))" ) >/dev/null 2>&1 &
    perf_pid=$!
  fi
  echo "== $w (partitions $partitions): chat-cli bench $a --size 1024 --duration $seconds --warmup $warmup"
  # shellcheck disable=SC2086
  "$cli" --server "127.0.0.1:$port" --token "$(cat "$dir/c/admin.token")" bench --nodes "$nodes" \
    $a --size 1024 --duration "$seconds" --warmup "$warmup" 2>/dev/null | tee "$dir/bench.out" ||
    echo "bench failed: $?"
  # A direct chat's id is known from the bench's user prefix: say which node led it (node 1,
  # where the client is, answers without a forward).
  prefix=$(sed -n 's/.*(users \([^)]*\)-\*).*/\1/p' "$dir/bench.out" | head -1)
  if [[ -n "$prefix" && "$a" == *"--chats 1 "* && "$a" != *--group-size* ]]; then
    token=$(cat "$dir/c/admin.token")
    chat="d:$prefix-0:$prefix-1"
    group=$(curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/admin/chats/$chat" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["partition"])' 2>/dev/null || true)
    leader=$(curl -fsS -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/admin/leaders?limit=100000" |
      python3 -c 'import json,sys; g=int(sys.argv[1]); print(next((l for (x, l, *_) in json.load(sys.stdin)["groups"] if x == g), "?"))' "${group:-0}" 2>/dev/null || true)
    echo "the chat's partition: ${group:-?}, its leader: node ${leader:-?} (the client is on node 1)"
  fi
  [[ -z "$perf_pid" ]] || wait "$perf_pid" || true
  stop_nodes
done
