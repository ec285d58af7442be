#!/usr/bin/env bash
# Installs the system packages Ferry builds, tests and benchmarks with, and only those that
# are missing: nothing is downloaded (not even `apt-get update`) when all are present.
#
# Add a package by appending it to PACKAGES. Swift itself is not installed here.
set -euo pipefail

PACKAGES=(
    qemu-utils      # qemu-img, qemu-io: the oracle in tests and the baseline in benchmarks
    liburing-dev    # io_uring for files and block devices
    libzstd-dev     # zstd-compressed qcow2 clusters
    libdeflate-dev  # zlib-compressed streamOptimized VMDK grains
    libvmdk-utils   # vmdkinfo: a second, independent VMDK reader in the tests
    libvhdi-utils   # vhdiinfo: a second, independent VHD and VHDX reader in the tests
    zlib1g-dev      # zlib-compressed qcow2 clusters
    nbdkit          # NBD test servers
    libnbd-bin      # nbdcopy, nbdinfo
    libnbd-dev      # the NBD endpoint
    util-linux      # losetup, fallocate
    strace          # tests see convert -C's copy_file_range calls
    fio             # bench/defaults.sh: the disk's own limit
    groff-base      # renders the generated man page in the tests
    pkg-config      # finds libnbd, libnfs, zlib and libzstd for the C modules
    libnfs-dev      # the NFS endpoint
    libiscsi-dev    # the iSCSI endpoint
    libssl-dev      # libcrypto: SHA-1/SHA-256 digests of an OVA's manifest
    libiscsi-bin    # iscsi-ls, iscsi-inq, iscsi-readcapacity16: reference clients
    tgt             # tgtd: iSCSI test target (user space)
    libnfs-utils    # nfs-cp, nfs-ls: reference clients
    nfs-ganesha     # NFS test server (user space)
    nfs-ganesha-vfs # its VFS backend
    rpcbind         # NFSv3 registration while ganesha starts
    iproute2        # network namespaces for qemu-img's nfs:// (needs a portmapper on 111)
    qemu-block-extra # qemu-img's nfs:// and iscsi:// drivers, the baselines of bench/
    python3         # hashlib: the independent blkhash reference in the tests
    librbd-dev      # the RBD endpoint's declarations (librbd itself is loaded on first use)
    ceph-common     # rbd, rados, ceph: the cluster's own tools, and librbd1/librados2
    ceph-mon        # the one-node test cluster of scripts/ceph-start.sh
    ceph-mgr
    ceph-osd
)

missing=()
for p in "${PACKAGES[@]}"; do
    # `dpkg -s` also lists removed-but-configured packages; require "install ok installed".
    if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: all ${#PACKAGES[@]} packages present"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: not root and no sudo; install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
