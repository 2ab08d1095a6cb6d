#!/bin/bash
# Owns: fetching other containerd builds for the host matrix (Debian 13's 1.7.x and Debian
# unstable's 2.x) as .debs with a private apt (its own sources list, lists and cache, from
# the mirror this machine is configured with) and extracting them under a cache dir; and,
# with --runc, a suite's runc the same way (the node tier runs Debian unstable's runc >= 1.2
# in the Debian 13 guest, whose glibc it needs).
# Does not: install anything system-wide, touch the system's apt sources or state, or run
# any test (node/matrix.sh and node/run.sh do).
#
# Usage: node/matrix-fetch.sh CACHE_DIR [--runc] SUITE...
#        (prints "SUITE VERSION BIN_DIR" per suite)
set -euo pipefail
mkdir -p "$1"; cache=$(cd "$1" && pwd); shift
package=containerd
if [ "${1:-}" = --runc ]; then package=runc; shift; fi
here=$(cd "$(dirname "$0")" && pwd)
. "$here/private-apt.sh"

for suite in "$@"; do
  apt_dir=$cache/apt-$suite
  private_apt "$apt_dir" "$suite"
  opts=("${apt_opts[@]}")
  version=$(apt-cache "${opts[@]}" show $package | sed -n 's/^Version: //p' | head -1)
  [ -n "$version" ] || { echo "matrix-fetch: no $package in $suite" >&2; exit 1; }
  out=$cache/$package-$suite-$version
  if [ $package = runc ]; then
    if [ ! -x "$out/bin/runc" ]; then
      rm -rf "$out" "$out.tmp"
      (cd "$apt_dir/debs" && rm -f runc_*.deb && apt-get "${opts[@]}" -qq download "runc=$version" >&2)
      mkdir -p "$out.tmp/root" "$out.tmp/bin"
      dpkg-deb -x "$apt_dir"/debs/runc_*.deb "$out.tmp/root"
      [ -x "$out.tmp/root/usr/sbin/runc" ] || { echo "matrix-fetch: $suite's runc package has no /usr/sbin/runc" >&2; exit 1; }
      cp "$out.tmp/root/usr/sbin/runc" "$out.tmp/bin/runc"
      mv "$out.tmp" "$out"
    fi
    echo "$suite $version $out/bin"
    continue
  fi
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
