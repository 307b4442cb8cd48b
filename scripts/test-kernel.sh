#!/usr/bin/env bash
# A production kernel older than this host's, for tests/kernels.rs: Debian 12's Linux 6.1 (no
# sock_*_length tracepoints, no uprobe-multi; kprobes and fentry allowed), its image and the
# modules a guest with the host's root over 9p needs, into DIR (default
# /var/cache/tracer/kernels/linux-6.1). Idempotent: nothing is fetched when DIR has them.
set -euo pipefail
dir=${1:-/var/cache/tracer/kernels/linux-6.1}
modules=(virtio_pci 9pnet_virtio 9p)
if [ -f "$dir/vmlinuz" ] && [ -f "$dir/modules/9p.ko" ]; then
  exit 0
fi
find_pkg() {
  apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1
}
pkg=$(find_pkg)
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(find_pkg)
fi
[ -n "$pkg" ] || { echo "no linux-image-6.1.0-*-amd64 package in apt's lists" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "$pkg")
dpkg-deb -x "$tmp"/*.deb "$tmp/x"
rm -rf "$dir"
mkdir -p "$dir/modules"
cp "$tmp"/x/boot/vmlinuz-* "$dir/vmlinuz"
# Each module after those it depends on (its modinfo's `depends=`), as modprobe would load them.
order=()
add() {
  local m=$1 ko dep
  [[ " ${order[*]} " == *" $m "* ]] && return
  ko=$(find "$tmp/x/lib/modules" -name "$m.ko" | head -1)
  [ -n "$ko" ] || { echo "module $m.ko not in $pkg" >&2; exit 1; }
  for dep in $(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
    add "$dep"
  done
  cp "$ko" "$dir/modules/"
  order+=("$m")
}
for m in "${modules[@]}"; do add "$m"; done
printf '%s\n' "${order[@]}" > "$dir/modules/order"
echo "$pkg" > "$dir/package"
echo "kernel $pkg in $dir"
