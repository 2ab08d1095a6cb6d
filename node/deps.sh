#!/bin/bash
# Owns: installing what the node tier needs on a Debian 12 host: debootstrap, e2fsprogs
# (mkfs.ext4 -d), and qemu-system-x86 with qemu-utils from bookworm-backports (the host's
# qemu-utils may already be 10.x from backports, which conflicts with bookworm's qemu 7.2).
# Does not: change the system's apt sources (backports is reached through a private
# sources dir and private lists, for this install only), or install the guests' packages
# (they go into the guest images by debootstrap).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/mirror.sh"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
export DEBIAN_FRONTEND=noninteractive

missing=
for p in debootstrap e2fsprogs zstd xz-utils ca-certificates; do installed "$p" || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "node-deps: installing$missing"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing
fi

if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
  mirror=$(debian_mirror)
  state=${NODE_DEPS_STATE:-/var/cache/isolated-node-apt}
  mkdir -p "$state/parts" "$state/lists/partial"
  # The system's own sources, plus backports on the same mirror, in a private parts dir.
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] && cp "$f" "$state/parts/"
  done
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" > "$state/parts/bookworm-backports.sources"
  opts=(-o Dir::Etc::SourceParts="$state/parts" -o Dir::State::Lists="$state/lists")
  [ -e /etc/apt/sources.list ] || opts+=(-o Dir::Etc::SourceList=/dev/null)
  echo "node-deps: installing qemu-system-x86 and qemu-utils from bookworm-backports"
  apt-get "${opts[@]}" update -qq
  apt-get "${opts[@]}" install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-utils
fi
qemu-system-x86_64 --version | head -1
