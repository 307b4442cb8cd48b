#!/usr/bin/env bash
# Production kernels older than this host's, for tests/kernels.rs, with the modules a guest
# whose root is the host's over 9p needs, into /var/cache/tracer/kernels/NAME:
#   linux-6.1   Debian 12's (apt): no sock_*_length tracepoints (6.3+), no uprobe-multi (6.6+)
#   linux-5.15  Ubuntu 22.04's (archive.ubuntu.com): no bpf_loop (5.17+) either
#   linux-5.10  Debian 11's (deb.debian.org): no bpf_task_pt_regs (5.15+) either, so no fentry
#               data path: the syscall tracepoints, the socket found from the file descriptor
# Usage: test-kernel.sh [NAME...] (default: all). Idempotent: nothing is fetched for a kernel
# already there.
set -euo pipefail
cache=/var/cache/tracer/kernels
ubuntu=http://archive.ubuntu.com/ubuntu
debian_security=http://deb.debian.org/debian-security
modules=(virtio_pci 9pnet_virtio 9p)

# The .deb files of NAME's newest image (and modules package), into $tmp.
fetch() {
  case $1 in
    linux-6.1)
      find_pkg() {
        apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -1
      }
      pkg=$(find_pkg)
      if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(find_pkg)
      fi
      [ -n "$pkg" ] || { echo "no linux-image-6.1.0-*-amd64 package in apt's lists" >&2; exit 1; }
      # Lists older than the archive name a package it no longer has: refreshed once.
      if ! (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "$pkg"); then
        apt-get update -qq
        pkg=$(find_pkg)
        (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "$pkg")
      fi
      ;;
    linux-5.15)
      curl -fsS "$ubuntu/dists/jammy-updates/main/binary-amd64/Packages.xz" | xz -dc > "$tmp/Packages"
      # Newest linux-image-5.15.0-N-generic, and its modules.
      pkg=$(sed -n 's/^Package: \(linux-image-5\.15\.0-[0-9]*-generic\)$/\1/p' "$tmp/Packages" | sort -V | tail -1)
      [ -n "$pkg" ] || { echo "no linux-image-5.15.0-*-generic in jammy-updates" >&2; exit 1; }
      for p in "$pkg" "${pkg/image/modules}"; do
        file=$(awk -v p="$p" '$0 == "Package: " p {f=1} f && /^Filename: / {print $2; exit}' "$tmp/Packages")
        (cd "$tmp" && curl -fsS -O "$ubuntu/$file")
      done
      ;;
    linux-5.10)
      curl -fsS "$debian_security/dists/bullseye-security/main/binary-amd64/Packages.xz" | xz -dc > "$tmp/Packages"
      # Newest linux-image-5.10.0-N-amd64 (modules included).
      pkg=$(sed -n 's/^Package: \(linux-image-5\.10\.0-[0-9]*-amd64\)$/\1/p' "$tmp/Packages" | sort -V | tail -1)
      [ -n "$pkg" ] || { echo "no linux-image-5.10.0-*-amd64 in bullseye-security" >&2; exit 1; }
      file=$(awk -v p="$pkg" '$0 == "Package: " p {f=1} f && /^Filename: / {print $2; exit}' "$tmp/Packages")
      (cd "$tmp" && curl -fsS -O "$debian_security/$file")
      ;;
    *) echo "unknown kernel $1 (linux-6.1, linux-5.15, linux-5.10)" >&2; exit 1 ;;
  esac
}

names=("$@")
[ $# -gt 0 ] || names=(linux-6.1 linux-5.15 linux-5.10)
for name in "${names[@]}"; do
  dir=$cache/$name
  if [ -f "$dir/vmlinuz" ] && [ -f "$dir/modules/order" ]; then
    continue
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  fetch "$name"
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x"; done
  rm -rf "$dir"
  mkdir -p "$dir/modules"
  cp "$tmp"/x/boot/vmlinuz-* "$dir/vmlinuz"
  # Each module after those it depends on (its modinfo's `depends=`), as modprobe would load
  # them; those built into the kernel are skipped.
  order=()
  add() {
    local m=$1 ko dep
    [[ " ${order[*]} " == *" $m "* ]] && return
    ko=$(find "$tmp/x/lib/modules" -name "$m.ko" | head -1)
    if [ -z "$ko" ]; then
      grep -qs "/$m.ko$" "$tmp"/x/lib/modules/*/modules.builtin && return
      echo "module $m.ko not in $name" >&2
      exit 1
    fi
    for dep in $(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
      add "$dep"
    done
    cp "$ko" "$dir/modules/"
    order+=("$m")
  }
  for m in "${modules[@]}"; do add "$m"; done
  printf '%s\n' "${order[@]}" > "$dir/modules/order"
  ls "$tmp"/*.deb | xargs -n1 basename > "$dir/packages"
  rm -rf "$tmp"
  trap - EXIT
  echo "kernel $name in $dir: $(tr '\n' ' ' < "$dir/packages")"
done
