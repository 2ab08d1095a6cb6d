#!/bin/bash
# Owns: what a guest does at boot with the run's payload disk (mounted at /payload by the
# image's node-suite.service): installs what `make install-files DESTDIR=payload/root` put
# there, writes the guest's isolated config, starts isolated with systemd, imports the test
# image and runs suite.sh once per runtime the guest tests (runc; crun too where
# payload/runtimes says so), then powers the guest off. Everything goes to the serial
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
  # crun as the runtime. isolated has no runtime_binary setting yet and passes no
  # runtime options, so containerd's config cannot name the binary for it (BinaryName
  # is an option of the CRI plugin's runtimes, and CRI is not what isolated calls); the
  # runc v2 shim runs "runc" from its PATH, which it inherits from containerd. So
  # containerd gets a PATH whose runc is a wrapper that logs each call and execs crun:
  # the log proves crun ran. The wrapper is the gap, see node/KNOWN-GAPS.md.
  echo "NODE-SUITE SWITCH $guest-crun"
  install -d /opt/node-crun
  cat > /opt/node-crun/runc <<'EOF'
#!/bin/sh
echo "$*" >> /run/node-crun-calls.log
exec /usr/bin/crun "$@"
EOF
  chmod 755 /opt/node-crun/runc
  install -d /etc/systemd/system/containerd.service.d
  printf '[Service]\nEnvironment=PATH=/opt/node-crun:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n' \
    > /etc/systemd/system/containerd.service.d/crun.conf
  systemctl stop isolated
  systemctl daemon-reload
  systemctl restart containerd
  if systemctl start isolated; then
    run_group "$guest-crun" nodecrun
    calls=$(grep -c . /run/node-crun-calls.log 2>/dev/null || echo 0)
    if grep -q '^create\| create ' /run/node-crun-calls.log 2>/dev/null; then
      echo "NODE-RESULT $guest-crun runtime_is_crun PASS crun was called $calls times"
    else
      echo "NODE-RESULT $guest-crun runtime_is_crun FAIL crun was never asked to create a container ($calls calls)"
    fi
  else
    fail_all "$guest-crun" "isolated did not start again"
  fi
fi

echo "NODE-INFO $guest isolated journal tail:"
journalctl -u isolated -u containerd --no-pager -o short-monotonic -n 40 | sed 's/^/  | /'
echo "NODE-SUITE END $guest"
systemctl poweroff --no-block
