#!/bin/sh
sync
for m in $(awk '$2 ~ "^/mnt/" {print $2}' /proc/mounts); do
  umount $m 2>/dev/null || umount -l $m
done
mount -o remount,ro /
sync
