#!/usr/bin/env bash
# What the tests and the bench drive, installed when missing (as root, idempotent): curl, wget
# (GnuTLS), wrk,
# nginx, promtool (Debian package prometheus), setpriv (util-linux), chromium and tmux (the
# dashboard and `tracer top` tests), h2load (nghttp2-client), python3-grpcio and python3-h2 (the h2c
# upgrade fixture) for the HTTP/2 tests, openssl, apache2, golang-go and nodejs (the TLS tests),
# nftables (a Service-like address translation), iproute2 (the other host's TUN device), qemu
# and a static busybox (tests/kernels.rs boots an older kernel, fetched by
# scripts/test-kernel.sh), and oha (crates.io) for the bench's fixed-rate load. python3 is part
# of the image.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for tool in curl:curl wget:wget wrk:wrk nginx:nginx promtool:prometheus setpriv:util-linux chromium:chromium tmux:tmux h2load:nghttp2-client openssl:openssl apache2:apache2 go:golang-go node:nodejs nft:nftables ip:iproute2 qemu-system-x86_64:qemu-system-x86; do
  command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool#*:}")
done
# For the system's python3 (the gRPC fixtures run with /usr/bin/python3, not a python earlier
# on PATH).
/usr/bin/python3 -c 'import grpc' 2>/dev/null || missing+=(python3-grpcio)
/usr/bin/python3 -c 'import h2' 2>/dev/null || missing+=(python3-h2)
# The initramfs needs busybox-static's (the busybox package's is dynamically linked).
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q "ok installed" || missing+=(busybox-static)
# scripts/test-kernel.sh unpacks Ubuntu's package index with it.
command -v xz >/dev/null || missing+=(xz-utils)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v oha >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/oha" ]; then
  toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
  cargo "+$toolchain" install oha --locked --quiet
fi
