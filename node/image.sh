#!/bin/bash
# Owns: building one Debian guest image for the node tier, offline from Debian packages
# (debootstrap from the machine's configured mirror), and caching it: a raw ext4 root
# disk, the kernel and a small initrd, under CACHE/<suite>-<key>/ where the key hashes this
# script and the package list, so a change to either rebuilds it. Old keys are removed.
# Does not: put isolated or any test into the image (node/run.sh brings those on a second
# disk at every run, so a code change never rebuilds an image), or boot it.
#
# Usage: node/image.sh CACHE SUITE    (prints the image dir on stdout)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/mirror.sh"
mkdir -p "$1"; cache=$(cd "$1" && pwd); suite=$2

# dbus: without it systemd-run and systemctl's bus calls fail. busybox-static: the test
# images are made from the host's, not the guest's; it is here for debugging the guest.
packages=systemd-sysv,linux-image-amd64,containerd,runc,iproute2,udev,kmod,dbus,procps,util-linux,e2fsprogs
case $suite in
  trixie) packages=$packages,crun ;;
esac
key=$( (cat "$0" "$here/mirror.sh"; echo "$packages") | sha256sum | cut -c1-12)
out=$cache/$suite-$key
if [ -e "$out/ready" ]; then echo "$out"; exit 0; fi

# Older builds of this suite are stale by definition: one image per suite is kept.
for old in "$cache/$suite"-*; do
  [ -d "$old" ] && [ "$old" != "$out" ] && [ "$old" != "$cache/$suite-debs" ] && rm -rf "$old"
done
rm -rf "$out"; mkdir -p "$out" "$cache/$suite-debs"
root=$out/rootfs
t0=$(date +%s)
# --cache-dir keeps the downloaded .debs (about 140 MB) for the next rebuild.
debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/$suite-debs" \
  "$suite" "$root" "$(debian_mirror)" > "$out/debootstrap.log" 2>&1 \
  || { tail -20 "$out/debootstrap.log" >&2; exit 1; }
t1=$(date +%s)
echo "node-image: debootstrap $suite took $((t1 - t0)) s" >&2

echo isonode > "$root/etc/hostname"
printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$root/etc/fstab"
# A getty on the serial console stops systemd's status lines there, which are the boot
# milestones the host polls.
for u in getty.target serial-getty@ttyS0.service getty@tty1.service \
         systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
         fstrim.timer man-db.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# The node suite: a oneshot at boot that mounts the run's payload disk (/dev/vdb) and runs
# its boot.sh, printing to the serial console; the payload powers the guest off at the end.
cat > "$root/etc/systemd/system/node-suite.service" <<'UNIT'
[Unit]
Description=isolated node suite (from the payload disk)
After=multi-user.target containerd.service
Wants=containerd.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'mkdir -p /payload && mount -o ro /dev/vdb /payload && exec /bin/bash /payload/boot.sh'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/node-suite.service "$root/etc/systemd/system/multi-user.target.wants/node-suite.service"
# Under TCG the default initrd (MODULES=most, 37 MB) costs seconds to unpack: only what
# mounts a virtio disk.
printf 'virtio_pci\nvirtio_blk\next4\n' > "$root/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
kver=$(ls "$root/lib/modules" | head -1)
chroot "$root" update-initramfs -u -k "$kver" > "$out/initramfs.log" 2>&1 \
  || { tail -20 "$out/initramfs.log" >&2; exit 1; }
cp "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$out/initrd.img"
# The uncompressed kernel boots through PVH, which skips the decompression that is slow
# under TCG; when it cannot be extracted the bzImage boots as well.
python3 "$here/extract-vmlinux.py" "$out/vmlinuz" "$out/vmlinux" 2>>"$out/initramfs.log" || rm -f "$out/vmlinux"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
# Versions, for the report.
chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' containerd runc crun systemd linux-image-amd64 2>/dev/null > "$out/versions" || true
qemu-img create -q -f raw "$out/base.raw" 3G
mkfs.ext4 -q -F -L isonode -d "$root" "$out/base.raw"
rm -rf "$root"
touch "$out/ready"
echo "node-image: $suite image built in $(( $(date +%s) - t0 )) s: $(tr '\n' ' ' < "$out/versions")" >&2
echo "$out"
