# husk: `make run` and `make test` set up what is missing and then run.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

CARGO  ?= cargo
TRIPLE := x86_64-unknown-linux-gnu
GUEST  := target/guest
IMAGES := target/images
# Guest binaries are static: the guest root image has no libc.
STATIC_RUSTFLAGS := -C target-feature=+crt-static

.PHONY: run test setup kernel guest images hostile-guest lint fuzz fuzz-long bench stress clean

# The main job: busybox in a microVM, like `docker run --rm`. The first run
# boots and snapshots the template (tens of seconds where the guest kernel
# is emulated); later runs restore it.
run: setup kernel guest images
	$(CARGO) build --locked --release -p husk-vmm -p husk-cli
	target/release/husk image import $(IMAGES)/busybox.oci.tar
	target/release/husk run --rm husk.local/busybox:latest \
	    sh -c 'echo "hello from $$(uname -sr) in a husk microVM, $$(grep -c ^processor /proc/cpuinfo) vCPU"'

test: setup kernel guest images hostile-guest lint
	# The end-to-end tests run the workspace's binaries (husk, husk-vmm,
	# husk-agent); cargo builds a package's binaries only for its own tests.
	$(CARGO) build --workspace --locked --bins
	$(CARGO) test --workspace --locked
	$(MAKE) fuzz

# Every guest- or client-facing parser: the virtio devices and the mmio
# transport (the guest), the agent's requests (the host, through a
# compromised runtime), the compose parser and the cluster API's decoding
# (users and clients). `make test` runs each briefly (FUZZ_SECONDS);
# `make fuzz-long` for FUZZ_LONG_SECONDS each (10 min by default), not
# part of `make test`. A crash fails either.
FUZZ_SECONDS ?= 15
FUZZ_LONG_SECONDS ?= 600
FUZZ_TARGETS := vmm/fuzz:virtio_blk vmm/fuzz:vsock_tx vmm/fuzz:mmio_transport \
	vmm/fuzz:virtio_rng vmm/fuzz:virtio_net \
	agent/fuzz:sandbox_request agent/fuzz:container_request \
	cli/fuzz:compose cli/fuzz:cluster_decode cli/fuzz:image_import
fuzz: setup
	scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-long: setup
	scripts/fuzz.sh $(FUZZ_LONG_SECONDS) $(FUZZ_TARGETS)

# Benchmarks print figures next to a peer's; not part of `make test`.
bench: setup kernel guest images hostile-guest
	$(CARGO) build --locked --release -p husk-vmm -p husk-cli -p husk-shim -p husk-orchestrator
	$(CARGO) build --locked --release -p husk-tests --example cri_pods --example cluster_bench --example scale_bench --example hostile
	bench/boot
	bench/snapshot
	bench/run
	bench/rootfs
	bench/ctr
	bench/cluster
	bench/scale
	bench/hostile

# The guest-path tests N times (default 5) beside a CPU hog; not part of
# `make test`. N, HOGS and TESTS (test binaries of tests/) can be set.
stress: setup kernel guest images
	scripts/stress.sh

setup:
	@scripts/setup.sh

# Built once per (source version, config, patches) into ~/.cache/husk.
kernel: setup
	@mkdir -p $(GUEST)
	@dir=$$(guest-kernel/build.sh); \
	  ln -sfn "$$dir/vmlinux" $(GUEST)/vmlinux; \
	  ln -sfn "$$dir/bzImage" $(GUEST)/bzImage; \
	  ln -sfn "$$dir/build-info" $(GUEST)/kernel-build-info

# The guest profile unwinds (Cargo.toml). The agent is built twice: first
# with the test-only panic requests (kept as husk-agent-panic-test, for
# tests/tests/agent_panics.rs), then as it ships; the second build reuses
# every dependency of the first.
GUEST_BUILD := RUSTFLAGS="$(STATIC_RUSTFLAGS)" LIBSECCOMP_LINK_TYPE=static \
	LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
	$(CARGO) build --locked --profile guest --target $(TRIPLE)
guest: setup
	$(GUEST_BUILD) -p husk-agent --features panic-test
	cp target/$(TRIPLE)/guest/husk-agent target/$(TRIPLE)/guest/husk-agent-panic-test
	$(GUEST_BUILD) -p husk-test-init -p husk-agent
	images/build-rootfs.sh $(GUEST)/rootfs.erofs target/$(TRIPLE)/guest/husk-test-init target/$(TRIPLE)/guest/husk-agent

# A bare-metal guest that attacks the VMM (tests/tests/hostile_guest.rs,
# bench/hostile); its own workspace and flags (images/hostile-guest).
hostile-guest: setup
	cd images/hostile-guest && $(CARGO) build --locked --release
	mkdir -p $(GUEST)
	cp images/hostile-guest/target/release/husk-hostile-guest $(GUEST)/hostile-guest

images: setup
	$(CARGO) build --locked --release -p husk-mkimage
	images/build-samples.sh $(IMAGES) target/release/husk-mkimage

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
