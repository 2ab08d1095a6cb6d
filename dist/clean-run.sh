#!/bin/bash
# make clean's part for make run's directory (.run): removes it, after
# releasing what a stopped or killed isolated left mounted or running under
# it, and says what it removes. Refuses while an isolated still runs there.
# Touches nothing outside the directory but processes whose state is in it
# (the embedded containerd, its shims and their runc containers).
#
#   bash dist/clean-run.sh DIR
set -eu

dir=${1:?usage: clean-run.sh DIR}
[ -e "$dir" ] || exit 0
dir=$(realpath "$dir")
state=$dir/state
lock=$state/isolated.lock

# isolated holds an flock on its state dir's lock file for as long as it runs.
if [ -e "$lock" ] && ! flock -n "$lock" true; then
  echo "make clean: isolated still runs on $state (pid $(cat "$lock" 2>/dev/null)): stop it first (Ctrl-C)" >&2
  exit 1
fi

# An embedded containerd that a killed isolated left running (its pid file
# names it, its command line names its config).
pidfile=$state/containerd/containerd.pid
if [ -f "$pidfile" ]; then
  pid=$(cat "$pidfile")
  if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$state/containerd/config.toml"; then
    echo "make clean: stopping the embedded containerd isolated left running (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
fi

# Actions left running in the embedded containerd: runc state of its own.
for root in "$state"/containerd/runc/*/; do
  [ -d "$root" ] || continue
  for c in "$root"*/; do
    [ -d "$c" ] || continue
    id=$(basename "$c")
    echo "make clean: removing container $id left running ($(basename "$root"))"
    runc --root "${root%/}" delete --force "$id" >/dev/null 2>&1 || true
  done
done
# Their shims: named by the embedded containerd's socket.
for p in /proc/[0-9]*; do
  if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q "^containerd-shim.* -address $state/containerd/containerd.sock"; then
    echo "make clean: stopping shim ${p#/proc/}"
    kill -9 "${p#/proc/}" 2>/dev/null || true
  fi
done

# Mounts under the directory, deepest first (findmnt escapes blanks as \x20).
findmnt -rn -o TARGET | while read -r m; do
  m=$(printf '%b' "$m")
  case "$m" in "$dir" | "$dir"/*) echo "$m" ;; esac
done | sort -r | while read -r m; do
  echo "make clean: unmounting $m"
  umount "$m" 2>/dev/null || umount -l "$m"
done

echo "make clean: removing $dir"
rm -rf "$dir"
