#!/usr/bin/env bash
# NFS -> local: Ferry against qemu-img convert and nfs-cp, reading a raw image from nfs-ganesha.
#
# A 1 GiB raw image, half random data and half holes (the layout of bench/raw.sh), lies in the
# export of a ganesha (FSAL VFS, NFSv3, 1 MiB rsize/wsize) started by scripts/nfs-start.sh
# inside a private network namespace with a portmapper on its port 111: qemu-img 7.2's nfs://
# takes no port options, so every client (Ferry, qemu-img, nfs-cp) runs in that namespace
# against the same server, with the same URL. Each command copies the image to a local raw
# file RUNS times, interleaved (one of each, then again, in an order shuffled afresh each round), with the page cache written back and
# dropped before each run (when permitted). Prints the median time of each command and its
# ratio to the qemu-img command that gives the same guarantee: Ferry's default (flushes the
# target) against `qemu-img -t writeback`, Ferry `-t unsafe` against qemu-img's default.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 BENCH_DIR=/tmp bench/nfs.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
bench_defaults 5
NETNS=${NETNS:-ferry-bench-nfs}
qemu-img --help | grep -qw nfs || { echo "bench: qemu-img has no nfs driver (install qemu-block-extra)" >&2; exit 1; }
command -v nfs-cp >/dev/null || { echo "bench: nfs-cp is missing (libnfs-utils)" >&2; exit 1; }

OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/ferry-bench-nfs.XXXXXX")
STATE=$OUT/server
cleanup() { "$HERE/../scripts/nfs-stop.sh" "$STATE" >/dev/null 2>&1 || true; rm -rf "$OUT"; }
trap cleanup EXIT
NETNS=$NETNS "$HERE/../scripts/nfs-start.sh" "$STATE" >&2
BENCH_IN=(ip netns exec "$NETNS")
SRC=$STATE/export/src.raw
URL=nfs://127.0.0.1/export/src.raw
DST=$OUT/dst

# name | command (URL is the source, DST the target) | target format | the row it is compared with
ROWS=(
    "ferry|$FERRY convert -q -f raw -O raw URL DST|raw|qemu-img -t writeback"
    "ferry -m 16 -W|$FERRY convert -q -f raw -O raw -m 16 -W URL DST|raw|qemu-img -t writeback -m 16 -W"
    "ferry --connections 1|$FERRY convert -q -f raw -O raw --connections 1 URL DST|raw|qemu-img -t writeback"
    "ferry -t unsafe|$FERRY convert -q -f raw -O raw -t unsafe URL DST|raw|qemu-img"
    "ferry -t unsafe --connections 1|$FERRY convert -q -f raw -O raw -t unsafe --connections 1 URL DST|raw|qemu-img"
    "ferry -t unsafe -m 16 -W|$FERRY convert -q -f raw -O raw -t unsafe -m 16 -W URL DST|raw|qemu-img -m 16 -W"
    "qemu-img|qemu-img convert -f raw -O raw URL DST|raw|"
    "qemu-img -m 16 -W|qemu-img convert -f raw -O raw -m 16 -W URL DST|raw|"
    "qemu-img -t writeback|qemu-img convert -f raw -O raw -t writeback URL DST|raw|"
    "qemu-img -t writeback -m 16 -W|qemu-img convert -f raw -O raw -t writeback -m 16 -W URL DST|raw|"
    "nfs-cp|nfs-cp URL DST|raw|qemu-img"
)
ROWS=("${ROWS[@]//URL/$URL}")

echo "bench: building a ${SIZE_MIB} MiB raw image on the server (half random data, half holes)" >&2
fill_half_data "$SRC" "$SIZE_MIB"
sync "$SRC"

check_drop_caches
DATA="half data" format_table "NFS (ganesha, NFSv3, loopback) -> local raw" ""
echo "nfs-cp copies every byte (holes included) and never flushes: it is compared with qemu-img's default."
