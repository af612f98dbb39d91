#!/bin/sh
# Mount every data disk (every virtio disk but vda) at /mnt/d-<serial>, i.e. at
# /mnt/<disk id>: the host passes the disk ID without "d-" as the virtio-blk serial.
# A blank disk is formatted (ext4, lazily) first; a disk with other content is mounted
# if the kernel knows its file system and is never formatted. The mount points of
# disks that are gone are unmounted.
# Usage: ecsnap-mount-disks [--wait SERIAL SECONDS]
exec 3>>/run/ecsnap-disks.log
say() { echo "$(date +%T) $*" >&3; }

lock=/run/ecsnap-mount-disks.lock
i=0
until mkdir $lock 2>/dev/null; do
  i=$((i + 1))
  [ $i -ge 300 ] && { say "breaking a stale lock"; rmdir $lock; }
  sleep 0.1
done
trap 'rmdir $lock' EXIT

mounted() { grep -q " $1 " /proc/mounts; }

scan() {
  for sys in /sys/block/vd*; do
    [ -e "$sys" ] || continue
    name=${sys##*/}
    [ "$name" = vda ] && continue
    serial=$(cat $sys/serial 2>/dev/null)
    [ -n "$serial" ] || { say "$name: no serial, left alone"; continue; }
    target=/mnt/d-$serial
    mounted $target && continue
    dev=/dev/$name
    [ -b $dev ] || mknod $dev b $(tr ':' ' ' < $sys/dev)
    magic=$(dd if=$dev bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
    mkdir -p $target
    if [ "$magic" = 53ef ]; then
      mount -t ext4 -o noinit_itable $dev $target && say "$name: mounted at $target"
    elif [ "$(dd if=$dev bs=65536 count=2 2>/dev/null | tr -d '\000' | wc -c)" = 0 ]; then
      say "$name: blank; formatting ext4"
      /sbin/mke2fs -q -F -t ext4 -m 1 \
        -E lazy_itable_init=1,lazy_journal_init=1,nodiscard $dev >&3 2>&1 &&
        mount -t ext4 -o noinit_itable $dev $target && say "$name: mounted at $target"
    else
      mount $dev $target 2>/dev/null && say "$name: mounted at $target" ||
        say "$name: unknown content, not formatted and not mounted"
    fi
  done
  # unmount what belonged to disks that were unplugged
  awk '$2 ~ "^/mnt/d-" {print $1, $2}' /proc/mounts | while read dev target; do
    if [ ! -e /sys/block/${dev##*/} ]; then
      umount -l $target && say "${dev##*/}: gone; unmounted $target"
      rmdir $target 2>/dev/null
    fi
  done
}

scan
if [ "$1" = --wait ]; then
  deadline=$(( $(date +%s) + ${3:-30} ))
  until mounted /mnt/d-$2; do
    [ $(date +%s) -ge $deadline ] && { say "d-$2 did not appear"; exit 1; }
    sleep 0.2
    scan
  done
fi
exit 0
