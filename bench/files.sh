#!/usr/bin/env bash
# Files (issue 14): upload and download throughput at R=3 on a fresh 3-node cluster of real
# chatd processes on loopback (fsync on), through `chat-cli upload` (to node 1) and
# `chat-cli download` (from node 2), and the physical limit beside it: one sequential
# write + fdatasync of the same bytes on this disk (dd). Prints each node's peak RSS growth
# during the transfers (VmHWM after minus VmRSS before).
#
#   bench/files.sh [SIZE_MIB ...]        (default: 1 100)
#
# CHATD_BIN, CHAT_CLI (default: $CARGO_TARGET_DIR/debug/…); MAX_MIB raises the nodes'
# files.max_bytes (default 100 MiB) for larger files; UPLOADER=curl uploads with one
# plain POST instead of `chat-cli upload` (resumable: POST + PATCH, hashing locally). Every process it starts is
# stopped by PID and its directory removed on exit.
set -euo pipefail

target=${CARGO_TARGET_DIR:-target}
bin=${CHATD_BIN:-$target/debug/chatd}
cli=${CHAT_CLI:-$target/debug/chat-cli}
[[ -x "$bin" && -x "$cli" ]] || { echo "no binaries at $bin / $cli" >&2; exit 2; }
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(1 100)

dir=$(mktemp -d /tmp/chatd-files-bench.XXXXXX)
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

port=$((20000 + (RANDOM % 400) * 100))
"$bin" cluster init --nodes 3 --base-port "$port" --out "$dir/c" >/dev/null
if [[ -n "${MAX_MIB:-}" ]]; then
  for i in 1 2 3; do
    sed -i "s/^max_bytes = .*/max_bytes = $((MAX_MIB << 20))/" "$dir/c/node-$i/chatd.toml"
  done
fi
for i in 1 2 3; do
  "$bin" run --config "$dir/c/node-$i/chatd.toml" 2>>"$dir/node-$i.log" >/dev/null &
  pids+=($!)
done
started=$(date +%s)
for i in 1 2 3; do
  until curl -fsS "http://127.0.0.1:$((port + 10 * (i - 1)))/readyz" >/dev/null 2>&1; do
    (( $(date +%s) - started < 120 )) || { echo "node $i not ready" >&2; exit 1; }
    sleep 0.3
  done
done
admin=$(cat "$dir/c/admin.token")
token=$(curl -fsS -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
  -d '{"user":"bench"}' "http://127.0.0.1:$port/v1/admin/users" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
sleep 1

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
now() { date +%s.%N; }

for mib in "${sizes[@]}"; do
  head -c "$((mib << 20))" /dev/urandom > "$dir/in.bin"
  sync
  # The disk's own figure for the same bytes: one sequential write + fdatasync.
  t0=$(now); dd if="$dir/in.bin" of="$dir/dd.bin" bs=1M conv=fdatasync status=none; t1=$(now)
  rm -f "$dir/dd.bin"
  declare -a before=()
  for i in 0 1 2; do before[$i]=$(rss "${pids[$i]}"); done
  t2=$(now)
  if [[ "${UPLOADER:-chat-cli}" == curl ]]; then
    # One-shot POST (no resume, no client-side hash): the server's path alone.
    id=$(curl -sS -X POST -H "Authorization: Bearer $token" -T "$dir/in.bin" \
      -H 'content-type: application/octet-stream' "http://127.0.0.1:$port/v1/files" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["file_id"])')
  else
    out=$("$cli" --server "127.0.0.1:$port" --token "$token" upload "$dir/in.bin" 2>/dev/null)
    id=$(echo "$out" | awk '{print $1}')
  fi
  t3=$(now)
  "$cli" --server "127.0.0.1:$((port + 10))" --token "$token" download "$id" -o "$dir/out.bin" >/dev/null 2>&1
  t4=$(now)
  cmp -s "$dir/in.bin" "$dir/out.bin" || { echo "downloaded bytes differ" >&2; exit 1; }
  growth=""
  for i in 0 1 2; do growth+=" n$((i + 1)) $(( ($(hwm "${pids[$i]}") - before[$i]) / 1024 )) MiB"; done
  python3 - "$mib" "$t0" "$t1" "$t2" "$t3" "$t4" "$growth" <<'PY'
import sys
mib = float(sys.argv[1]); t0, t1, t2, t3, t4 = map(float, sys.argv[2:7])
print(f"{mib:6.0f} MiB: upload {mib/(t3-t2):7.1f} MiB/s ({t3-t2:6.2f} s) · download {mib/(t4-t3):7.1f} MiB/s ({t4-t3:6.2f} s) · dd write+fdatasync {mib/(t1-t0):7.1f} MiB/s · peak RSS growth:{sys.argv[7]}")
PY
  rm -f "$dir/out.bin"
done
