#!/bin/bash
# What `make run` runs once isolated is built: isolated in the foreground, on
# the system containerd when one answers, else on an embedded one, serving a
# local socket under RUN_DIR. Owns only the choice of defaults; every setting
# is isolated's own.
#
# isolated's documented environment is honoured (issue 14: make run passed
# flags that overrode it): a default is passed as a flag only for a setting
# whose environment variable is unset, and none at all when ISOLATED_CONFIG
# names a file (the file then decides, with the environment above it). The
# make variables BIND, METRICS_BIND and FLOW_ENDPOINT, when given, are passed
# as flags and so win over both (make hands them over as RUN_BIND, ...).
#
#   RUN_DIR=.run [ISOLATED_BIN=...] [SYSTEM_SOCK=...] [RUN_PRINT=1] dist/run.sh
#
# RUN_PRINT=1 prints the command line instead of running it.
set -eu

run_dir=${RUN_DIR:?RUN_DIR is the directory of make run\'s state and socket}
bin=${ISOLATED_BIN:-./target/release/isolated}
system_sock=${SYSTEM_SOCK:-/run/containerd/containerd.sock}
args=()

# flag VALUE-VARIABLE ENV-VARIABLE FLAG DEFAULT: the make variable if given,
# else nothing if the environment (or a config file) decides, else the default.
flag() {
  if [ -n "${!1+x}" ]; then
    args+=("$3" "${!1}")
  elif [ -z "${!2+x}" ] && [ -z "${ISOLATED_CONFIG:-}" ] && [ -n "${4+x}" ]; then
    args+=("$3" "$4")
  fi
}

# Socket only: a TCP listener needs authentication first (README "Securing a node").
flag RUN_BIND DIREKTIV_ISOLATE_BIND --bind ""
# isolated's own default (127.0.0.1:9464) unless asked.
flag RUN_METRICS_BIND ISOLATED_METRICS_BIND --metrics-bind
# No flow engine: results are kept for isolatectl.
flag RUN_FLOW_ENDPOINT DIREKTIV_FLOW_ENDPOINT --flow-endpoint none
flag NONE ISOLATED_STATE_DIR --state-dir "$run_dir/state"
flag NONE ISOLATED_SOCKET --socket "$run_dir/isolated.sock"

if [ -n "${ISOLATED_CONFIG:-}" ]; then
  echo "make run: settings from $ISOLATED_CONFIG and the environment; make run adds none of its own"
elif [ -n "${ISOLATED_EMBEDDED_CONTAINERD+x}" ] || [ -n "${ISOLATED_CONTAINERD_ADDRESS+x}" ]; then
  echo "make run: containerd as the environment says"
# A socket file first: without one, ctr waits 10 s for its connection to time out.
elif [ -S "$system_sock" ] && timeout 0.8 ctr --address "$system_sock" version >/dev/null 2>&1; then
  echo "make run: using the system containerd at $system_sock"
  args+=(--containerd-address "$system_sock")
else
  echo "make run: no containerd answers at $system_sock: isolated starts its own under ${ISOLATED_STATE_DIR:-$run_dir/state}/containerd"
  args+=(--embedded-containerd)
fi

socket=${ISOLATED_SOCKET:-$run_dir/isolated.sock}
[ -n "${ISOLATED_CONFIG:-}" ] || echo "make run: serving the local socket $socket: export ISOLATECTL_SOCKET=$socket"
if [ -n "${RUN_PRINT:-}" ]; then
  printf '%q ' "$bin" "${args[@]}"
  echo
  exit 0
fi
mkdir -p "$run_dir"
exec "$bin" "${args[@]}"
