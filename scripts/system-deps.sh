#!/usr/bin/env bash
# Install the Debian packages ecsnap needs, when missing. Idempotent; needs root (or sudo).
set -euo pipefail
# ceph-*, python3-rbd/rados, qemu-block-extra (QEMU's rbd driver): the RBD storage backend
# and its tests (a throwaway single-node cluster, tests/ceph.py); the Makefile makes the
# venv from /usr/bin/python3 so that it sees python3-rbd. libnbd-bin (nbdfuse) and fuse3
# (fusermount3): looking inside disks, a read-only qemu-nbd export shown as a FUSE file that
# e2fsprogs' debugfs reads (adapters/inspect/debugfs.py)
PACKAGES=(qemu-utils qemu-system-x86 postgresql e2fsprogs fakeroot chromium libnbd-bin fuse3
          python3-venv btrfs-progs xfsprogs gcc libc6-dev
          ceph-mon ceph-osd ceph-common python3-rbd python3-rados qemu-block-extra
          ${ECSNAP_EXTRA_PACKAGES:-})
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
# the packaged PostgreSQL cluster is not used: tests start their own throwaway servers
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
  $SUDO pg_ctlcluster --force "$(pg_lsclusters -h | awk 'NR==1{print $1}')" main stop || true
fi
