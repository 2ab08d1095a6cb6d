#!/bin/bash
# Owns: a kubectl for `make test-deploy`, from Debian's own kubernetes-client package of the
# machine's suite, fetched as a .deb with a private apt (node/private-apt.sh) and extracted
# under a cache dir; prints the kubectl's path.
# Does not: install anything system-wide (a kubectl already on the machine is not used:
# the check must run the same client everywhere), nor run any check (integration/deploy.rs).
#
# Usage: deploy/fetch-kubectl.sh CACHE_DIR
set -euo pipefail
mkdir -p "$1"; cache=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../node/private-apt.sh"
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
apt_dir=$cache/apt-$suite
private_apt "$apt_dir" "$suite"
version=$(apt-cache "${apt_opts[@]}" show kubernetes-client | sed -n 's/^Version: //p' | head -1)
[ -n "$version" ] || { echo "fetch-kubectl: no kubernetes-client in $suite" >&2; exit 1; }
out=$cache/kubernetes-client-$version
if [ ! -x "$out/usr/bin/kubectl" ]; then
  rm -rf "$out" "$out.tmp"
  (cd "$apt_dir/debs" && rm -f kubernetes-client_*.deb \
     && apt-get "${apt_opts[@]}" -qq download "kubernetes-client=$version" >&2)
  dpkg-deb -x "$apt_dir"/debs/kubernetes-client_*.deb "$out.tmp"
  mv "$out.tmp" "$out"
fi
echo "$out/usr/bin/kubectl"
