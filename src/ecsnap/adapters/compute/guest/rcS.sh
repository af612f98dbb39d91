#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
hostname -F /etc/hostname
for m in /lib/modules/ecsnap/*.ko; do insmod $m 2>/dev/null; done
/sbin/ecsnap-mount-disks
