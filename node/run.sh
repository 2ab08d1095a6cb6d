#!/bin/bash
# Owns: `make test-node`: the real-node tier. For each guest (Debian 12, Debian 13) it
# gets the cached image (node/image.sh), makes the run's payload disk (make install-files
# into it, the guest's scripts, the test image as an OCI archive), boots the guest with
# QEMU on a throw-away overlay, follows its serial console to the suite's results, and
# prints per guest "N passed, M failed" and the guest's cgroup fs type. The guests boot in
# parallel (TCG uses one host core each). Exits non-zero if a check failed that
# node/KNOWN-GAPS.md does not list as an expected failure, or if a guest did not finish.
# Does not: build the images itself, install host packages (node/deps.sh), or leave
# anything running: it kills exactly the QEMU processes it started, by pid, and removes
# their overlays and payloads.
#
# Usage: node/run.sh BUILD_DIR [GUEST...]    (guests: bookworm trixie; default both)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
build_dir=$(cd "$1" && pwd); shift
guests=("$@"); [ ${#guests[@]} -gt 0 ] || guests=(bookworm trixie)
cache=${NODE_CACHE:-$repo/.cache/node}
# A boot (to multi-user.target) gets 300 s; the suite after it NODE_SUITE_TIMEOUT.
boot_timeout=${NODE_BOOT_TIMEOUT:-300}
suite_timeout=${NODE_SUITE_TIMEOUT:-900}
mkdir -p "$cache"
run_dir=$(mktemp -d "$cache/run.XXXXXX")
declare -A qemu_pid=()

cleanup() {
  local g
  for g in "${!qemu_pid[@]}"; do
    local pid=${qemu_pid[$g]}
    if kill -0 "$pid" 2>/dev/null; then
      echo "node: killing $g's QEMU (pid $pid)"
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
    fi
  done
  # The logs stay for a failed run's diagnosis: copied out before the dir goes.
  mkdir -p "$cache/logs"
  cp "$run_dir"/*.serial.log "$cache/logs/" 2>/dev/null
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ts() { date +%s; }
t_start=$(ts)

# KVM only where it is real hardware virtualisation: /dev/kvm backed by kvm_pvm cannot boot
# a stock kernel (it crawls with no error), see the tier's notes.
if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
  accel=(-accel kvm -cpu host -smp 1)
else
  accel=(-accel tcg,thread=single,tb-size=128 -cpu max -smp 1)
fi

# 1. Images (cached) and the test image. Uncached, the builds run in parallel: each is
# mostly waiting on downloads and dpkg's fsyncs (debootstrap took 438-514 s each here,
# side by side, on a busy machine), so together they take about as long as one.
declare -A image=() build_pid=()
t0=$(ts)
for g in "${guests[@]}"; do
  bash "$here/image.sh" "$cache" "$g" > "$run_dir/$g.image" 2> >(sed "s/^/  [$g image] /" >&2) &
  build_pid[$g]=$!
done
for g in "${guests[@]}"; do
  wait "${build_pid[$g]}" || { echo "node: building the $g image failed"; exit 1; }
  image[$g]=$(cat "$run_dir/$g.image")
  echo "node: $g image ${image[$g]##*/} ready after $(( $(ts) - t0 )) s ($(tr '\n' ' ' < "${image[$g]}/versions"))"
done
APPLETS=all sh "$repo/dist/demo-image.sh" "$run_dir/busybox.tar" node.invalid/busybox:1 >/dev/null \
  || { echo "node: building the test image failed"; exit 1; }

# 2. Per guest: payload disk, overlay, boot.
for g in "${guests[@]}"; do
  p=$run_dir/$g.payload
  mkdir -p "$p/root"
  make -s -C "$repo" install-files DESTDIR="$p/root" BUILD_DIR="$build_dir" >/dev/null \
    || { echo "node: make install-files failed"; exit 1; }
  cp "$here/guest/boot.sh" "$here/guest/suite.sh" "$run_dir/busybox.tar" \
    /etc/ssl/certs/ca-certificates.crt "$p/"
  echo "$g" > "$p/guest"
  case $g in
    trixie)
      # runc >= 1.2 signals only a container's init at a Kill with `all`; Debian 13 has
      # 1.1.15, so Debian unstable's (it needs glibc 2.38, which Debian 13 has and the
      # build host does not) is brought in and chosen by path with runtime_binary.
      printf 'runc\ncrun\nrunc-sid\n' > "$p/runtimes"
      runc_sid=$(bash "$here/matrix-fetch.sh" "${MATRIX_CACHE:-$repo/.cache/matrix}" --runc sid) \
        || { echo "node: fetching Debian unstable's runc failed"; exit 1; }
      mkdir -p "$p/runc-sid"
      cp "$(echo "$runc_sid" | awk '{print $3}')/runc" "$p/runc-sid/runc"
      echo "node: Debian unstable's runc $(echo "$runc_sid" | awk '{print $2}') for $g" ;;
    *) echo runc > "$p/runtimes" ;;
  esac
  size_mb=$(( $(du -sm "$p" | cut -f1) + 64 ))
  qemu-img create -q -f raw "$run_dir/$g.payload.raw" "${size_mb}M"
  mkfs.ext4 -q -F -d "$p" "$run_dir/$g.payload.raw" || { echo "node: payload disk failed"; exit 1; }
  rm -rf "$p"
  qemu-img create -q -f qcow2 -F raw -b "${image[$g]}/base.raw" "$run_dir/$g.overlay.qcow2"
  kernel=${image[$g]}/vmlinux; [ -e "$kernel" ] || kernel=${image[$g]}/vmlinuz
  log=$run_dir/$g.serial.log
  : > "$log"
  # 3 GiB: isolated's node budget (issue 13) keeps the larger of 1 GiB and an eighth
  # out for the host, so a 1 GiB guest ran one 256 MiB action at a time and the
  # suite's three concurrent sleepers "never ran".
  qemu-system-x86_64 "${accel[@]}" -m 3072 -nodefaults -display none -monitor none \
    -serial "file:$log" -no-reboot \
    -kernel "$kernel" -initrd "${image[$g]}/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.unified_cgroup_hierarchy=1 systemd.show_status=1 loglevel=4 panic=-1" \
    -drive "file=$run_dir/$g.overlay.qcow2,if=virtio,format=qcow2" \
    -drive "file=$run_dir/$g.payload.raw,if=virtio,format=raw,readonly=on" \
    > "$run_dir/$g.qemu.log" 2>&1 &
  qemu_pid[$g]=$!
  echo "node: $g booting (QEMU pid ${qemu_pid[$g]}, ${accel[1]})"
done

# 3. Follow every console to its end: milestones with deadlines, polled.
declare -A booted=() ended=() t_boot=() t_end=() status=()
t_launch=$(ts)
while :; do
  pending=0
  for g in "${guests[@]}"; do
    [ -n "${status[$g]:-}" ] && continue
    log=$run_dir/$g.serial.log
    now=$(ts)
    if [ -z "${booted[$g]:-}" ] && grep -q 'Reached target.*[Mm]ulti-[Uu]ser' "$log"; then
      booted[$g]=1; t_boot[$g]=$(( now - t_launch ))
      echo "node: $g reached multi-user.target after ${t_boot[$g]} s"
    fi
    if grep -q "NODE-SUITE END $g" "$log"; then
      t_end[$g]=$(( now - t_launch )); status[$g]=done
    elif ! kill -0 "${qemu_pid[$g]}" 2>/dev/null; then
      status[$g]="QEMU exited before the suite ended: $(tail -3 "$run_dir/$g.qemu.log" | tr '\n' ' ')"
    elif [ -z "${booted[$g]:-}" ] && [ $(( now - t_launch )) -ge "$boot_timeout" ]; then
      status[$g]="no multi-user.target within $boot_timeout s"
    elif [ $(( now - t_launch )) -ge $(( boot_timeout + suite_timeout )) ]; then
      status[$g]="suite not ended within $suite_timeout s of boot"
    else
      pending=1
    fi
  done
  [ $pending = 0 ] && break
  sleep 1
done

# The guests power themselves off; one that does not within 60 s is killed.
for g in "${guests[@]}"; do
  deadline=$(( $(ts) + 60 ))
  while kill -0 "${qemu_pid[$g]}" 2>/dev/null && [ "$(ts)" -lt "$deadline" ]; do sleep 0.5; done
done

# 4. Results.
expected_failure() { # GROUP CHECK: listed in KNOWN-GAPS.md as "expected failure: GROUP CHECK"
  grep -q "^- expected failure: \`$1 $2\`" "$here/KNOWN-GAPS.md" 2>/dev/null
}
unexpected=0
total_pass=0; total_fail=0
for g in "${guests[@]}"; do
  log=$run_dir/$g.serial.log
  echo "=== node: $g"
  grep -a "NODE-INFO $g " "$log" | sed "s/^.*NODE-INFO $g /  /" | grep -v 'journal tail' | tr -d '\r'
  if [ "${status[$g]}" != done ]; then
    echo "  FAILED TO FINISH: ${status[$g]}"
    echo "  last console lines:"; tail -25 "$log" | tr -d '\r' | sed 's/^/  | /'
    unexpected=1
  fi
  groups=$(grep -a -o "NODE-RESULT $g[a-z0-9-]* " "$log" | awk '{print $2}' | sort -u)
  [ -n "$groups" ] || groups=$g
  for grp in $groups; do
    pass=0; fail=0; known=0
    while read -r _ _ check verdict reason; do
      [ -n "$check" ] || continue
      if [ "$verdict" = PASS ]; then
        pass=$((pass + 1)); echo "  PASS $grp $check: $reason"
      else
        fail=$((fail + 1))
        if expected_failure "$grp" "$check"; then
          known=$((known + 1)); echo "  FAIL $grp $check (expected, node/KNOWN-GAPS.md): $reason"
        else
          unexpected=1; echo "  FAIL $grp $check: $reason"
        fi
      fi
    done < <(grep -a "NODE-RESULT $grp " "$log" | sed 's/^.*NODE-RESULT/NODE-RESULT/' | tr -d '\r')
    [ $((pass + fail)) -gt 0 ] || { unexpected=1; echo "  no results from $grp"; }
    cgfs=$(grep -a -o "NODE-INFO $g cgroupfs [a-z0-9]*" "$log" | awk '{print $4}')
    echo "$grp: $pass passed, $fail failed ($known expected) on cgroup fs ${cgfs:-unknown}; boot ${t_boot[$g]:-?} s, boot+suite ${t_end[$g]:-?} s"
    total_pass=$((total_pass + pass)); total_fail=$((total_fail + fail))
  done
done
echo "node tier: $(( $(ts) - t_start )) s in all"
echo "$total_pass passed, $total_fail failed"
exit $unexpected
