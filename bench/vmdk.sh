#!/usr/bin/env bash
# VMDK on the local filesystem: Ferry against qemu-img convert.
#
# A raw guest image of SIZE_MIB, half data and half holes, of realistic and partly
# compressible data (binaries and text, the corpus of bench/qcow2-write.sh), is converted
# raw -> vmdk streamOptimized (compressed grains) and raw -> vmdk monolithicSparse; and
# VMDK images made from it by qemu-img (monolithicSparse and streamOptimized) are converted
# to qcow2 and to raw (those rows need Ferry's VMDK reader). Each by Ferry and by qemu-img,
# RUNS times, interleaved in an order shuffled afresh each round; the page cache is written
# back and dropped before each run (when permitted). Prints the median time of each command,
# the size of what it wrote and its ratio to the qemu-img command it is compared with (both
# flush: ferry's default against qemu-img -t writeback). Every output is checked with
# qemu-img check and compare on the first run.
#
# KIND=write (or read) keeps only the writing (reading) rows.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 KIND=write BENCH_DIR=/tmp bench/vmdk.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5

OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/ferry-bench-vmdk.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
SRC=$OUT/src.raw
SPARSE=$OUT/src-sparse.vmdk
STREAM=$OUT/src-stream.vmdk
# The stream image as the one member of an OVA, read in place; qemu-img reads the same bytes
# through its raw driver's offset (the member's data follows its 512-byte tar header).
OVA=$OUT/app.ova
OVA_JSON="json:{\"driver\": \"vmdk\", \"file\": {\"driver\": \"raw\", \"offset\": 512, \"file\": {\"driver\": \"file\", \"filename\": \"$OVA\"}}}"
DST=$OUT/dst

# kind | name | command (SRC the source, DST the target) | target format | the qemu-img row it is compared with
ALL_ROWS=(
    "write|ferry raw -> streamOptimized|$FERRY convert -q -f raw -O vmdk -o subformat=streamOptimized SRC DST|vmdk|qemu-img raw -> streamOptimized"
    "write|ferry raw -> streamOptimized (zlib)|FERRY_VMDK_DEFLATE=zlib $FERRY convert -q -f raw -O vmdk -o subformat=streamOptimized SRC DST|vmdk|qemu-img raw -> streamOptimized"
    "write|qemu-img raw -> streamOptimized|qemu-img convert -f raw -O vmdk -o subformat=streamOptimized -t writeback SRC DST|vmdk|"
    "write|ferry raw -> monolithicSparse|$FERRY convert -q -f raw -O vmdk SRC DST|vmdk|qemu-img raw -> monolithicSparse"
    "write|qemu-img raw -> monolithicSparse|qemu-img convert -f raw -O vmdk -t writeback SRC DST|vmdk|"
    "read|ferry monolithicSparse -> qcow2|$FERRY convert -q -f vmdk -O qcow2 $SPARSE DST|qcow2|qemu-img monolithicSparse -> qcow2"
    "read|qemu-img monolithicSparse -> qcow2|qemu-img convert -f vmdk -O qcow2 -t writeback $SPARSE DST|qcow2|"
    "read|ferry monolithicSparse -> raw|$FERRY convert -q -f vmdk -O raw $SPARSE DST|raw|qemu-img monolithicSparse -> raw"
    "read|qemu-img monolithicSparse -> raw|qemu-img convert -f vmdk -O raw -t writeback $SPARSE DST|raw|"
    "read|ferry streamOptimized -> qcow2|$FERRY convert -q -f vmdk -O qcow2 $STREAM DST|qcow2|qemu-img streamOptimized -> qcow2"
    "read|qemu-img streamOptimized -> qcow2|qemu-img convert -f vmdk -O qcow2 -t writeback $STREAM DST|qcow2|"
    "read|ferry streamOptimized -> raw|$FERRY convert -q -f vmdk -O raw $STREAM DST|raw|qemu-img streamOptimized -> raw"
    "read|qemu-img streamOptimized -> raw|qemu-img convert -f vmdk -O raw -t writeback $STREAM DST|raw|"
    "read|ferry OVA streamOptimized -> qcow2|$FERRY convert -q -f vmdk -O qcow2 $OVA/disk1.vmdk DST|qcow2|qemu-img OVA streamOptimized -> qcow2"
    "read|qemu-img OVA streamOptimized -> qcow2|qemu-img convert -O qcow2 -t writeback '$OVA_JSON' DST|qcow2|"
)
select_rows

CORPUS=$OUT/corpus
make_corpus "$CORPUS"

echo "bench: building a ${SIZE_MIB} MiB guest image in $OUT (half data, half holes)" >&2
fill_half_data "$SRC" "$SIZE_MIB" "$CORPUS"
rm -f "$CORPUS"
if [ "$KIND" != write ]; then
    qemu-img convert -f raw -O vmdk "$SRC" "$SPARSE"
    qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$SRC" "$STREAM"
    cp "$STREAM" "$OUT/disk1.vmdk"
    tar --format=ustar -cf "$OVA" -C "$OUT" disk1.vmdk
    rm -f "$OUT/disk1.vmdk"
    python3 -c 'import sys, tarfile; sys.exit(tarfile.open(sys.argv[1]).getmember("disk1.vmdk").offset_data != 512)' "$OVA" \
        || { echo "bench: the OVA's member does not start at 512" >&2; exit 1; }
fi
sync

check_drop_caches

format_table "VMDK" "vmdk qcow2"
