#!/bin/sh
# qemu-guest-agent on its virtio-serial port (no udev here, so look it up in sysfs).
# init respawns this script; while /run/ecsnap-agent-off exists the agent stays down.
while [ -e /run/ecsnap-agent-off ]; do sleep 1; done
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/${p##*/} -t /run 2>>/run/qemu-ga.log
  fi
done
sleep 2
