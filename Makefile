# direktiv-isolate: build, run, test.
#
#   make run    build and run isolated (starts a private containerd if none answers)
#   make test   install what is missing, then fmt, clippy, unit and integration tests
#   make bench  the benchmark (see README)

SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=

# Debian packages the build, the daemon and the tests need.
DEB_PACKAGES := containerd runc protobuf-compiler busybox-static docker-registry \
                apache2-utils containernetworking-plugins iptables iproute2

RUN_DIR := $(CURDIR)/.run
SYSTEM_SOCK := /run/containerd/containerd.sock

.PHONY: all build deps run test fmt-check clippy unit integration bench clean

all: build

# Installs only what is missing, so a machine that has it all is not touched.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v cargo >/dev/null || { echo "cargo is missing: install Rust first"; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy

build: deps
	$(CARGO) build --release --bins

# Runs isolated in the foreground against the system containerd, or, when
# none answers, against a private one started here under .run/.
run: build
	@mkdir -p $(RUN_DIR)
	@if ctr --address $(SYSTEM_SOCK) version >/dev/null 2>&1; then \
	  echo "using the system containerd at $(SYSTEM_SOCK)"; \
	  exec ./target/release/isolated --containerd-address $(SYSTEM_SOCK) --state-dir $(RUN_DIR)/state; \
	else \
	  echo "no containerd at $(SYSTEM_SOCK): starting a private one under $(RUN_DIR)"; \
	  printf 'version = 2\nroot = "%s/containerd/root"\nstate = "%s/containerd/state"\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "%s/containerd.sock"\n[ttrpc]\n  address = "%s/containerd.sock.ttrpc"\n' \
	    $(RUN_DIR) $(RUN_DIR) $(RUN_DIR) $(RUN_DIR) > $(RUN_DIR)/containerd.toml; \
	  containerd --config $(RUN_DIR)/containerd.toml > $(RUN_DIR)/containerd.log 2>&1 & cpid=$$!; \
	  trap "kill $$cpid; wait $$cpid" EXIT INT TERM; \
	  for i in $$(seq 100); do ctr --address $(RUN_DIR)/containerd.sock version >/dev/null 2>&1 && break; sleep 0.1; done; \
	  ./target/release/isolated --containerd-address $(RUN_DIR)/containerd.sock --state-dir $(RUN_DIR)/state; \
	fi

test: deps fmt-check clippy unit integration

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --lib --bins

integration:
	$(CARGO) test --test integration

clean:
	$(CARGO) clean
	rm -rf $(RUN_DIR)
