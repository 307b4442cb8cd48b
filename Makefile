# The README's two set-up commands. Each installs what it needs first (the pinned toolchain is
# installed explicitly: rustup may be told not to install toolchains on its own).
TOOLCHAIN := $(shell sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)

.PHONY: toolchain run test bench lint

toolchain:
	rustup toolchain install $(TOOLCHAIN) --profile minimal --component rust-src,clippy,rustfmt

# Build everything and run the daemon against this host (root). Flags: make run ARGS="--listen ..."
run: toolchain
	cargo xtask run -- $(ARGS)

# Every test: unit, integration (real probes), and the bench's smoke run.
test: toolchain
	scripts/test-deps.sh
	scripts/test-kernel.sh
	cargo xtask test

bench: toolchain
	scripts/test-deps.sh
	cargo xtask bench

lint: toolchain
	cargo xtask lint
