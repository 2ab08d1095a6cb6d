#!/bin/bash
# Owns: what a guest does at boot with the run's payload disk (mounted at /payload by the
# image's node-suite.service): installs what `make install-files DESTDIR=payload/root` put
# there, writes the guest's isolated config, starts isolated with systemd, imports the test
# image and runs suite.sh once per runtime the guest tests (runc; crun and Debian
# unstable's runc too where payload/runtimes says so, each in a namespace whose
# [namespaces.NAME] table chooses it as its runtime_binary), then powers the guest off. Everything goes to the serial
# console. Does not: judge the results (the host does), or build anything.
set -u
P=/payload
guest=$(cat $P/guest)
echo "NODE-SUITE BEGIN $guest"
echo "NODE-INFO $guest cgroupfs $(stat -fc %T /sys/fs/cgroup)"
echo "NODE-INFO $guest kernel $(uname -r)"
echo "NODE-INFO $guest containerd $(containerd --version)"
echo "NODE-INFO $guest runc $(runc --version | head -1)"
command -v crun >/dev/null && echo "NODE-INFO $guest crun $(crun --version | head -1)"
echo "NODE-INFO $guest systemd $(systemctl --version | head -1)"

# debootstrap copied the build host's resolv.conf; the guest has no network device, and
# no query should even be tried towards an address that is not the guest's own.
: > /etc/resolv.conf

# The image has no ca-certificates (debootstrap minbase) and isolated's registry client
# panics without a CA root (node/KNOWN-GAPS.md): the build host's bundle is brought in,
# as any Debian node with ca-certificates has it.
install -d /etc/ssl/certs
cp $P/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt

# make install-files' tree, as `make install` would have put it on this machine.
cp -a $P/root/. /
install -d /etc/isolated
# Local socket only, no flow engine (results are kept for isolatectl), no CNI plugins
# in the guest: loopback-only actions.
cat > /etc/isolated/config.toml <<'EOF'
bind = ""
flow_endpoint = "none"
network = "none"
EOF
# The node's runtime stays runc; namespaces choose another one by runtime_binary.
if grep -qx crun $P/runtimes 2>/dev/null; then
  printf '\n[namespaces.nodecrun]\nruntime_binary = "crun"\n' >> /etc/isolated/config.toml
fi
if grep -qx runc-sid $P/runtimes 2>/dev/null; then
  install -D -m 755 $P/runc-sid/runc /opt/runc-sid/runc
  echo "NODE-INFO $guest runc-sid $(/opt/runc-sid/runc --version | head -1)"
  printf '\n[namespaces.noderuncsid]\nruntime_binary = "/opt/runc-sid/runc"\n' >> /etc/isolated/config.toml
fi
systemctl daemon-reload

fail_all() { # GROUP REASON: the daemon is not there, so every check of GROUP failed.
  echo "NODE-RESULT $1 daemon FAIL $2"
}

# isolated is Type=simple: systemctl returns when it is forked, not when it serves. Polls
# the local socket with a deadline (under TCG it answered 4 s after its start here).
wait_socket() {
  local deadline=$(( $(date +%s) + 120 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    isolatectl ls >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

run_group() { # GROUP NAMESPACE
  local group=$1 ns=$2 out
  wait_socket || { fail_all "$group" "isolated does not answer on its socket within 120 s"; return; }
  out=$(timeout 180 isolatectl image import $P/busybox.tar -n "$ns" 2>&1) \
    || { fail_all "$group" "image import failed: $out"; return; }
  echo "NODE-INFO $group imported $out"
  bash $P/suite.sh "$group" "$ns" node.invalid/busybox:1
}

t0=$(date +%s)
if systemctl enable --now isolated 2>&1; then
  echo "NODE-INFO $guest isolated started by systemd in $(( $(date +%s) - t0 )) s: $(systemctl is-active isolated)"
  run_group "$guest" node
else
  fail_all "$guest" "systemctl enable --now isolated failed: $(journalctl -u isolated -n 5 --no-pager -o cat | tr '\n' ' ')"
fi

if grep -qx crun $P/runtimes 2>/dev/null; then
  # crun, chosen by the namespace's runtime_binary: the whole suite, and runtime_binary
  # proves it was crun (the shim's options, crun's own state under its root).
  echo "NODE-SUITE SWITCH $guest-crun"
  NODE_RUNTIME_BIN=crun NODE_RUNTIME_ROOT=/run/containerd/crun run_group "$guest-crun" nodecrun
fi
if grep -qx runc-sid $P/runtimes 2>/dev/null; then
  # runc >= 1.2, by path: it signals only the init at a Kill with `all`, so the
  # signal checks are the point (and the shim's options prove it ran).
  echo "NODE-SUITE SWITCH $guest-runc-sid"
  NODE_RUNTIME_BIN=/opt/runc-sid/runc NODE_RUNTIME_ROOT=/run/containerd/runc \
    NODE_CHECKS="end_to_end runtime_binary timeout_kills_all term_reaches_children" \
    run_group "$guest-runc-sid" noderuncsid
fi

echo "NODE-INFO $guest isolated journal tail:"
journalctl -u isolated -u containerd --no-pager -o short-monotonic -n 40 | sed 's/^/  | /'
echo "NODE-SUITE END $guest"
systemctl poweroff --no-block
