# direktiv-isolate: build, run, test.
#
#   make run          build and run isolated (embedded containerd if no system one answers);
#                     BIND=, METRICS_BIND=, FLOW_ENDPOINT= and isolated's environment honoured
#   make clean        .run (unmounting what is left under it) and cargo's target
#   make demo-image   the quick start's demo action as an OCI archive under .run/
#   make test-quick   install what is missing, then fmt, clippy, unit, deploy and integration tests
#   make test-deploy  deploy/'s Kubernetes and Nomad manifests, checked offline (Debian's kubectl)
#   make test-matrix  the integration suite's core, limits and durability trials against
#                     Debian 13's containerd 1.7 and Debian unstable's 2.x (node/matrix.sh)
#   make test-node    the real-node tier: Debian 12 and 13 guests under QEMU, systemd and
#                     cgroup v2, isolated installed and run as a service (node/run.sh)
#   make test         all three
#   make install      binaries, /etc/isolated/config.toml, systemd unit, completions
#   make uninstall    removes what install put there (a config you edited stays)
#   make bench        the benchmark (see README)
#   make soak         10,000 mixed actions, then nothing left (make test runs 1,000)

SHELL := /bin/bash
CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
# systemd reads units from /usr/local/lib/systemd/system too.
UNITDIR ?= $(PREFIX)/lib/systemd/system
DATADIR ?= $(PREFIX)/share
# Where install takes the binaries from.
BUILD_DIR ?= target/release

# Debian packages the build, the daemon and the tests need.
DEB_PACKAGES := containerd runc protobuf-compiler libprotobuf-dev busybox-static docker-registry \
                apache2-utils containernetworking-plugins iptables iproute2 \
                gcc libc6-dev openssl util-linux

RUN_DIR := $(CURDIR)/.run
SYSTEM_SOCK := /run/containerd/containerd.sock
# make run BIND=host:port METRICS_BIND=host:port FLOW_ENDPOINT=host:port: when
# given, these win over isolated's environment; unset, the environment decides,
# then make run's defaults (socket only, isolated's metrics port, no flow engine).
given = $(if $(filter-out undefined default,$(origin $(1))),$(2)='$($(1))')

.PHONY: all build deps node-deps run demo-image test test-quick test-deploy test-matrix test-node \
        fmt-check clippy unit integration bench soak clean install install-files uninstall

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
# none answers (probed in under a second), against its own embedded one under
# .run/state/containerd. It serves its own socket, .run/isolated.sock (a system
# isolated's is /run/isolated/isolated.sock), and no TCP listener unless BIND
# is set (which then needs authentication: see README "Securing a node").
# isolated's environment (ISOLATED_*, DIREKTIV_*) is honoured: dist/run.sh.
run: build
	@$(call given,BIND,RUN_BIND) $(call given,METRICS_BIND,RUN_METRICS_BIND) \
	  $(call given,FLOW_ENDPOINT,RUN_FLOW_ENDPOINT) \
	  RUN_DIR='$(RUN_DIR)' SYSTEM_SOCK='$(SYSTEM_SOCK)' ISOLATED_BIN=./target/release/isolated \
	  bash dist/run.sh

# The quick start's demo action (demo.invalid/echo:latest), built offline
# from busybox-static: import it with `isolatectl image import`.
demo-image: $(RUN_DIR)/demo-echo.tar

$(RUN_DIR)/demo-echo.tar: dist/demo-image.sh
	@mkdir -p $(RUN_DIR)
	sh dist/demo-image.sh $@ demo.invalid/echo:latest

# Where cargo put the release binaries the node tier installs into its guests.
NODE_BUILD_DIR ?= $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release

test: test-quick test-matrix test-node

test-quick: deps fmt-check clippy unit test-deploy integration

# The deployments under deploy/ checked offline by Debian's kubectl (fetched as a .deb
# with a private apt under .cache/deploy, never installed) and isolated's own config
# parser; no cluster is needed (integration/deploy.rs).
test-deploy: deps
	ISOLATED_TEST_KUBECTL=$$(bash deploy/fetch-kubectl.sh .cache/deploy) $(CARGO) test --test deploy

# Other containerd builds, fetched as .debs with a private apt under .cache/matrix
# (never installed), each running the host suite's core, reaper and durability trials.
test-matrix: deps
	bash node/matrix.sh

# What the node tier needs on the host: debootstrap, qemu-system-x86 (from
# bookworm-backports, through a private sources dir: the system's sources are unchanged).
node-deps: deps
	bash node/deps.sh

test-node: node-deps
	$(CARGO) build --release --bins
	bash node/run.sh $(NODE_BUILD_DIR)

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --lib --bins

# The soak runs on its own after the rest: two trials of hundreds of actions
# at once would only measure how two cores share out.
integration:
	$(CARGO) test --test integration -- --skip durability::soak
	ISOLATE_SOAK_ACTIONS=1000 $(CARGO) test --test integration -- durability::soak

# The soak: 10,000 mixed actions at concurrency 16 (make test runs 1,000), then
# nothing may be left and the daemons' RSS must be back within 10 %.
soak: deps
	ISOLATE_SOAK_ACTIONS=$${ISOLATE_SOAK_ACTIONS:-10000} $(CARGO) test --test integration -- durability::soak

# The benchmark of README's "Performance" section: isolated against ctr and runc.
bench: deps
	$(CARGO) bench --bench e2e

# Installs what `make build` made; install-files alone installs BUILD_DIR's
# binaries without building (packaging, tests).
install: build install-files

install-files:
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSCONFDIR)/isolated $(DESTDIR)$(UNITDIR)
	install -m 755 $(BUILD_DIR)/isolated $(BUILD_DIR)/isolatectl $(DESTDIR)$(BINDIR)/
	$(BUILD_DIR)/isolated --print-config > $(DESTDIR)$(SYSCONFDIR)/isolated/config.toml.default
	@# An existing config is the operator's: it is kept, the new defaults go beside it.
	@if [ ! -e $(DESTDIR)$(SYSCONFDIR)/isolated/config.toml ]; then \
	  cp $(DESTDIR)$(SYSCONFDIR)/isolated/config.toml.default $(DESTDIR)$(SYSCONFDIR)/isolated/config.toml; \
	fi
	@if [ -d runtime-spec/cni ]; then \
	  install -d $(DESTDIR)$(SYSCONFDIR)/isolated/cni; \
	  for f in runtime-spec/cni/*.conflist; do \
	    [ -e $(DESTDIR)$(SYSCONFDIR)/isolated/cni/$$(basename $$f) ] || install -m 644 $$f $(DESTDIR)$(SYSCONFDIR)/isolated/cni/; \
	  done; \
	fi
	sed 's|@BINDIR@|$(BINDIR)|g' dist/isolated.service > $(DESTDIR)$(UNITDIR)/isolated.service
	chmod 644 $(DESTDIR)$(UNITDIR)/isolated.service
	install -d $(DESTDIR)$(DATADIR)/bash-completion/completions \
	  $(DESTDIR)$(DATADIR)/zsh/site-functions $(DESTDIR)$(DATADIR)/fish/vendor_completions.d
	$(BUILD_DIR)/isolatectl completions bash > $(DESTDIR)$(DATADIR)/bash-completion/completions/isolatectl
	$(BUILD_DIR)/isolatectl completions zsh > $(DESTDIR)$(DATADIR)/zsh/site-functions/_isolatectl
	$(BUILD_DIR)/isolatectl completions fish > $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/isolatectl.fish
	@echo "installed; then: systemctl daemon-reload && systemctl enable --now isolated"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/isolated $(DESTDIR)$(BINDIR)/isolatectl \
	  $(DESTDIR)$(UNITDIR)/isolated.service \
	  $(DESTDIR)$(DATADIR)/bash-completion/completions/isolatectl \
	  $(DESTDIR)$(DATADIR)/zsh/site-functions/_isolatectl \
	  $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/isolatectl.fish
	@# The config goes only if it is still the generated one.
	@c=$(DESTDIR)$(SYSCONFDIR)/isolated; \
	if [ -e $$c/config.toml.default ] && cmp -s $$c/config.toml $$c/config.toml.default; then rm -f $$c/config.toml; fi; \
	rm -f $$c/config.toml.default; \
	for f in runtime-spec/cni/*.conflist; do \
	  [ -e "$$f" ] && cmp -s $$f $$c/cni/$$(basename $$f) && rm -f $$c/cni/$$(basename $$f); \
	done; \
	rmdir $$c/cni $$c 2>/dev/null; true

# .run after unmounting and stopping what a stopped or killed make run left in it;
# refused while isolated still runs there.
clean:
	bash dist/clean-run.sh $(RUN_DIR)
	$(CARGO) clean
