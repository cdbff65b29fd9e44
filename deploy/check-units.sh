#!/usr/bin/env bash
# Checks the systemd units and the install path, the way CI does (.ci/run calls this):
#  1. builds chatd and chat-cli (the dev profile, in $CARGO_TARGET_DIR);
#  2. `chatd cluster init` for the 3-host example layout, then deploy/install.sh --dry-run
#     (must change nothing) and deploy/install.sh --root into a temp root; checks the
#     installed files, their modes and the config's data_dir;
#  3. `systemd-analyze verify` of chatd@node-1.service and chatd.target in that root (with
#     the binary in place): it exits 0 on warnings, so any output fails the check;
#  4. `systemd-analyze security --offline=true` with an exposure threshold.
# Installs systemd (for systemd-analyze) with apt-get if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/chatd-target}"
# Highest accepted exposure, in tenths (systemd-analyze's unit): 12 = 1.2 on its 0-10 scale.
# chatd@.service scores 1.1 with systemd 252 (Debian 12).
SECURITY_THRESHOLD="${SECURITY_THRESHOLD:-12}"

fail() { echo "check-units: FAIL: $*" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "check-units: installing systemd (for systemd-analyze)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd
fi

cargo build -q -p chatd -p chat-cli
bin="$CARGO_TARGET_DIR/debug"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$bin/chatd" cluster init --nodes 3 --out "$tmp/cluster" \
  --host 10.0.0.1 --host 10.0.0.2 --host 10.0.0.3 --data-dir-root /var/lib/chatd >/dev/null

echo "== install.sh --dry-run changes nothing"
deploy/install.sh --node-dir "$tmp/cluster/node-1" --bin-dir "$bin" --root "$tmp/dry" \
  --dry-run >"$tmp/dry.out" 2>&1 || { cat "$tmp/dry.out"; fail "install.sh --dry-run failed"; }
[ ! -e "$tmp/dry" ] || fail "install.sh --dry-run wrote $tmp/dry"
grep -q "chatd@.service" "$tmp/dry.out" || fail "install.sh --dry-run did not show the unit install"

echo "== install.sh into a temp root"
r="$tmp/root"
deploy/install.sh --node-dir "$tmp/cluster/node-1" --bin-dir "$bin" --root "$r" >/dev/null 2>"$tmp/install.err" \
  || { cat "$tmp/install.err"; fail "install.sh failed"; }
mode() { stat -c %a "$1"; }
for f in usr/local/bin/chatd usr/local/bin/chat-cli etc/chatd/node-1/chatd.toml \
         etc/chatd/node-1/node.pem etc/chatd/node-1/node.key etc/chatd/node-1/ca.pem \
         etc/systemd/system/chatd@.service etc/systemd/system/chatd.target; do
  [ -f "$r/$f" ] || fail "$f not installed"
done
[ "$(mode "$r/etc/chatd/node-1")" = 750 ] || fail "/etc/chatd/node-1 is not 0750"
[ "$(mode "$r/etc/chatd/node-1/node.key")" = 640 ] || fail "node.key is not 0640"
[ "$(mode "$r/etc/chatd/node-1/chatd.toml")" = 640 ] || fail "chatd.toml is not 0640"
[ "$(mode "$r/usr/local/bin/chatd")" = 755 ] || fail "chatd is not 0755"
grep -qx 'data_dir = "/var/lib/chatd/node-1"' "$r/etc/chatd/node-1/chatd.toml" \
  || fail "installed data_dir is not /var/lib/chatd/node-1"
cmp -s deploy/systemd/chatd@.service "$r/etc/systemd/system/chatd@.service" || fail "unit differs"

# A node dir with data_dir = "data" (init without --data-dir-root) gets the unit's path.
"$bin/chatd" cluster init --nodes 1 --out "$tmp/plain" >/dev/null
deploy/install.sh --node-dir "$tmp/plain/node-1" --name node-9 --bin-dir "$bin" --root "$tmp/root2" \
  >/dev/null 2>&1 || fail "install.sh of a plain node dir failed"
grep -qx 'data_dir = "/var/lib/chatd/node-9"' "$tmp/root2/etc/chatd/node-9/chatd.toml" \
  || fail "data_dir not rewritten to the unit's StateDirectory"

# systemd-analyze --root needs the distribution's units (sysinit.target, ...) in the root.
sysunits=/usr/lib/systemd/system
[ -d "$sysunits" ] || sysunits=/lib/systemd/system
mkdir -p "$r/usr/lib/systemd"
cp -a "$sysunits" "$r/usr/lib/systemd/"

echo "== systemd-analyze verify (any output fails)"
set +e
out="$(systemd-analyze verify --root="$r" chatd@node-1.service chatd.target 2>&1)"
rc=$?
set -e
if [ $rc -ne 0 ] || [ -n "$out" ]; then
  echo "$out" >&2
  fail "systemd-analyze verify: exit $rc, $(printf '%s\n' "$out" | wc -l) line(s) of output"
fi

echo "== systemd-analyze security --offline=true --threshold=$SECURITY_THRESHOLD"
set +e
sec="$(systemd-analyze security --offline=true --threshold="$SECURITY_THRESHOLD" \
  --root="$r" chatd@node-1.service 2>&1)"
rc=$?
set -e
if [ $rc -ne 0 ]; then
  echo "$sec" >&2
  fail "exposure above $SECURITY_THRESHOLD (tenths) or systemd-analyze failed (exit $rc)"
fi
printf '%s\n' "$sec" | grep "Overall exposure level"
echo "check-units: OK"
