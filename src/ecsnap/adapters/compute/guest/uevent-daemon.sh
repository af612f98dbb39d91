#!/bin/sh
# hot-plugged and removed disks: /sbin/ecsnap-uevent runs for every kernel uevent
/sbin/uevent /sbin/ecsnap-uevent
sleep 5  # init respawns this script; do not spin if uevent cannot run
