#!/bin/bash
# Owns: fetching other containerd builds for the host matrix (Debian 13's 1.7.x and Debian
# unstable's 2.x) as .debs with a private apt (its own sources list, lists and cache, from
# the mirror this machine is configured with) and extracting them under a cache dir.
# Does not: install anything system-wide, touch the system's apt sources or state, or run
# any test (node/matrix.sh does).
#
# Usage: node/matrix-fetch.sh CACHE_DIR SUITE...   (prints "SUITE VERSION BIN_DIR" per suite)
set -euo pipefail
mkdir -p "$1"; cache=$(cd "$1" && pwd); shift
here=$(cd "$(dirname "$0")" && pwd)
. "$here/private-apt.sh"

for suite in "$@"; do
  apt_dir=$cache/apt-$suite
  private_apt "$apt_dir" "$suite"
  opts=("${apt_opts[@]}")
  version=$(apt-cache "${opts[@]}" show containerd | sed -n 's/^Version: //p' | head -1)
  [ -n "$version" ] || { echo "matrix-fetch: no containerd in $suite" >&2; exit 1; }
  out=$cache/containerd-$suite-$version
  if [ ! -x "$out/bin/containerd" ]; then
    rm -rf "$out" "$out.tmp"
    (cd "$apt_dir/debs" && rm -f containerd_*.deb && apt-get "${opts[@]}" -qq download "containerd=$version" >&2)
    mkdir -p "$out.tmp/root" "$out.tmp/bin"
    dpkg-deb -x "$apt_dir"/debs/containerd_*.deb "$out.tmp/root"
    # Only containerd, its runc v2 shim and ctr: the runtime (runc) stays the host's.
    for b in containerd containerd-shim-runc-v2 ctr; do
      if [ -x "$out.tmp/root/usr/bin/$b" ]; then ln -s ../root/usr/bin/$b "$out.tmp/bin/$b"; fi
    done
    [ -x "$out.tmp/bin/containerd" ] && [ -x "$out.tmp/bin/containerd-shim-runc-v2" ] \
      || { echo "matrix-fetch: $suite's containerd package lacks containerd or its shim" >&2; exit 1; }
    mv "$out.tmp" "$out"
  fi
  echo "$suite $version $out/bin"
done
