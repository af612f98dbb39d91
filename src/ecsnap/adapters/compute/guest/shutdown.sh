#!/bin/sh
# qemu-ga runs `shutdown -h -P|-H|-r +0 "hypervisor initiated shutdown"`; busybox has no
# shutdown, but poweroff, halt and reboot (init then runs /etc/init.d/rcK).
for arg in "$@"; do
  case "$arg" in
    -r) exec /sbin/reboot ;;
    -H) exec /sbin/halt ;;
  esac
done
exec /sbin/poweroff
