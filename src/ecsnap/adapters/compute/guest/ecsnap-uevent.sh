#!/bin/sh
# Run by busybox uevent for each kernel uevent: rescan the data disks when a whole
# virtio disk comes or goes.
[ "$SUBSYSTEM" = block ] || exit 0
case "$DEVNAME" in
  vd[a-z] | vd[a-z][a-z]) ;;
  *) exit 0 ;;
esac
case "$ACTION" in
  add | remove) exec /sbin/ecsnap-mount-disks ;;
esac
