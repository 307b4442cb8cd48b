#!/usr/bin/env bash
# What the tests and the bench drive, installed when missing (as root, idempotent): curl, wrk,
# nginx, promtool (Debian package prometheus), setpriv (util-linux), chromium and tmux (the
# dashboard and `tracer top` tests), and oha (crates.io) for the
# bench's fixed-rate load. python3 is part of the image.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=()
for tool in curl:curl wrk:wrk nginx:nginx promtool:prometheus setpriv:util-linux chromium:chromium tmux:tmux; do
  command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v oha >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/oha" ]; then
  toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
  cargo "+$toolchain" install oha --locked --quiet
fi
