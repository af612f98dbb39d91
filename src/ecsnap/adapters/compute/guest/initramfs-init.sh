#!/bin/sh
# ecsnap initramfs: load the virtio modules, mount the root disk, switch to it.
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in MODULES; do
  insmod /lib/modules/$m.ko || echo "initramfs: cannot load $m"
done
root=/dev/vda
mode=rw
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=/dev/*) root=${arg#root=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
  esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o $mode "$root" /newroot; then
  echo "initramfs: cannot mount $root; here is a shell"
  exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
