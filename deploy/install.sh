#!/usr/bin/env bash
# Installs one chatd node for systemd:
#   binaries      chatd, chat-cli            -> <root>/usr/local/bin/            (0755)
#   node files    chatd.toml, node.pem,      -> <root>/etc/chatd/<name>/         (dir 0750,
#                 node.key, ca.pem                files 0640, root:chatd; ca.pem 0644)
#   units         chatd@.service, chatd.target -> <root>/etc/systemd/system/     (0644)
#   data          /var/lib/chatd/<name>: created by systemd (StateDirectory=chatd/%i),
#                 owned by the `chatd` system user this script creates.
# The node directory is one `node-<id>/` of `chatd cluster init --out DIR` (better with
# `--data-dir-root /var/lib/chatd`); its data_dir is set to /var/lib/chatd/<name> if it
# says otherwise. The cluster CA key and the admin token are never installed.
#
# Usage: deploy/install.sh --node-dir DIR [--name NAME] [--bin-dir DIR] [--root DIR]
#                          [--dry-run]
#   --node-dir DIR  the node's directory from `chatd cluster init` (required)
#   --name NAME     the instance name [default: the directory's name, e.g. node-1]
#   --bin-dir DIR   where chatd and chat-cli are
#                   [default: ${CARGO_TARGET_DIR:-~/.cache/chatd-target}/debug]
#   --root DIR      install under DIR instead of / (for packaging and CI): no user is
#                   created, no ownership changed, systemd is not reloaded
#   --dry-run       print what would be done, change nothing
# Then: systemctl enable --now chatd@<name>
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
node_dir="" name="" root="/" dry=0
bin_dir="${CARGO_TARGET_DIR:-$HOME/.cache/chatd-target}/debug"

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --node-dir) node_dir="${2:?--node-dir needs a value}"; shift 2 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --bin-dir) bin_dir="${2:?--bin-dir needs a value}"; shift 2 ;;
    --root|--prefix) root="${2:?--root needs a value}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[ -n "$node_dir" ] || { usage >&2; die "--node-dir is required"; }
[ -d "$node_dir" ] || die "node directory $node_dir does not exist"
node_dir="$(cd "$node_dir" && pwd)"
[ -n "$name" ] || name="$(basename "$node_dir")"
[[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "instance name '$name' must be [A-Za-z0-9_.-]"
for f in chatd.toml node.pem node.key ca.pem; do
  [ -f "$node_dir/$f" ] || die "$node_dir/$f is missing (give a node-<id>/ directory of 'chatd cluster init')"
done
[ -x "$bin_dir/chatd" ] || die "$bin_dir/chatd not found: build it (cargo build -p chatd) or give --bin-dir"
have_cli=1
[ -x "$bin_dir/chat-cli" ] || { have_cli=0; echo "install.sh: $bin_dir/chat-cli not found; installing chatd only" >&2; }
case "$root" in /*) ;; *) die "--root must be an absolute path" ;; esac
root="${root%/}"
real_root=0
[ -z "$root" ] && real_root=1
if [ "$real_root" = 1 ] && [ "$dry" = 0 ] && [ "$(id -u)" -ne 0 ]; then
  die "installing into / needs root (or use --root DIR / --dry-run)"
fi

etc="$root/etc/chatd/$name"
units="$root/etc/systemd/system"
bin="$root/usr/local/bin"
data_dir="/var/lib/chatd/$name"

run() {
  if [ "$dry" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# The service user. Under --root nothing on this machine changes.
if [ "$real_root" = 1 ]; then
  if ! getent passwd chatd >/dev/null; then
    run useradd --system --user-group --no-create-home --home-dir /var/lib/chatd \
      --shell /usr/sbin/nologin --comment "chatd chat node" chatd
  fi
  owner=(root chatd)
else
  owner=()
  echo "install.sh: installing under $root: no user created, ownership left as is" >&2
fi

# install(1) with owner root:chatd when installing for real.
put() { # mode source dest
  if [ ${#owner[@]} -eq 2 ]; then
    run install -m "$1" -o "${owner[0]}" -g "${owner[1]}" "$2" "$3"
  else
    run install -m "$1" "$2" "$3"
  fi
}

run install -d -m 0755 "$bin" "$units" "$root/etc/chatd"
run install -m 0755 "$bin_dir/chatd" "$bin/chatd"
[ "$have_cli" = 1 ] && run install -m 0755 "$bin_dir/chat-cli" "$bin/chat-cli"

if [ ${#owner[@]} -eq 2 ]; then
  run install -d -m 0750 -o root -g chatd "$etc"
else
  run install -d -m 0750 "$etc"
fi
put 0640 "$node_dir/chatd.toml" "$etc/chatd.toml"
put 0640 "$node_dir/node.pem" "$etc/node.pem"
put 0640 "$node_dir/node.key" "$etc/node.key"
put 0644 "$node_dir/ca.pem" "$etc/ca.pem"

# The data directory is the unit's StateDirectory; the certificate paths stay relative to
# the config file (/etc/chatd/<name>/).
current="$(sed -n 's/^data_dir = "\(.*\)"$/\1/p' "$node_dir/chatd.toml" | head -n 1)"
[ -n "$current" ] || die "$node_dir/chatd.toml has no top-level data_dir line"
if [ "$current" != "$data_dir" ]; then
  echo "install.sh: data_dir \"$current\" -> \"$data_dir\" (the unit's StateDirectory)" >&2
  run sed -i "0,/^data_dir = .*/s||data_dir = \"$data_dir\"|" "$etc/chatd.toml"
fi

run install -m 0644 "$here/systemd/chatd@.service" "$units/chatd@.service"
run install -m 0644 "$here/systemd/chatd.target" "$units/chatd.target"

if [ "$real_root" = 1 ] && [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
else
  echo "install.sh: systemd is not running here (or --root): no daemon-reload" >&2
fi

cat <<EOF
installed chatd node $name${root:+ under $root}:
  config  $etc/chatd.toml
  data    $data_dir (created by systemd at first start)
  unit    $units/chatd@.service
start it:   systemctl enable --now --no-block chatd@$name
watch it:   systemctl status chatd@$name; journalctl -u chatd@$name -f
EOF
