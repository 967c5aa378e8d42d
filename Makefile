# husk: `make run` and `make test` set up what is missing and then run.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO  ?= cargo
TRIPLE := x86_64-unknown-linux-gnu
GUEST  := target/guest
IMAGES := target/images
# Guest binaries are static: the guest root image has no libc.
STATIC_RUSTFLAGS := -C target-feature=+crt-static

.PHONY: run test setup kernel guest images lint unit clean

run: setup kernel guest
	guest-kernel/boot-qemu.sh $(GUEST)/vmlinux $(GUEST)/rootfs.erofs

test: setup kernel guest images lint
	$(CARGO) test --workspace --locked

setup:
	@scripts/setup.sh

# Built once per (source version, config, patches) into ~/.cache/husk.
kernel: setup
	@mkdir -p $(GUEST)
	@dir=$$(guest-kernel/build.sh); \
	  ln -sfn "$$dir/vmlinux" $(GUEST)/vmlinux; \
	  ln -sfn "$$dir/bzImage" $(GUEST)/bzImage; \
	  ln -sfn "$$dir/build-info" $(GUEST)/kernel-build-info

guest: setup
	RUSTFLAGS="$(STATIC_RUSTFLAGS)" $(CARGO) build --locked --release --target $(TRIPLE) -p husk-test-init
	images/build-rootfs.sh $(GUEST)/rootfs.erofs target/$(TRIPLE)/release/husk-test-init

images: setup
	$(CARGO) build --locked --release -p husk-mkimage
	images/build-samples.sh $(IMAGES) target/release/husk-mkimage

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
