#!/usr/bin/env bash
# raw -> qcow2 on the local filesystem: Ferry against qemu-img convert.
#
# A 1 GiB raw guest image, half data and half holes, of realistic and partly compressible data
# (binaries from /usr/bin and /usr/lib and text from /usr/share and /usr/include, the same
# corpus as bench/qcow2.sh) is converted to qcow2 three ways: plain, compressed with zlib (-c)
# and compressed with zstd (-c -o compression_type=zstd), by Ferry and by qemu-img, RUNS times
# each. Runs are interleaved (one of each command, then again, in an order shuffled afresh
# each round) so that drift in disk speed hits every command alike; before each run the page cache
# is written back and dropped (when permitted). Prints the median time of each command, the
# size of what it wrote, and its ratio to the qemu-img command that gives the same guarantee
# (both flush: ferry's default against qemu-img -t writeback). Every output is checked with
# qemu-img check and compare on the first run.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 BENCH_DIR=/tmp bench/qcow2-write.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5
bench_workdir ferry-bench-qcow2w

# name | command (SRC is the raw image, DST the target) | target format | the qemu-img row it is compared with
ROWS=(
    "ferry|$FERRY convert -q -f raw -O qcow2 SRC DST|qcow2|qemu-img -t writeback"
    "qemu-img -t writeback|qemu-img convert -f raw -O qcow2 -t writeback SRC DST|qcow2|"
    "ferry -c (zlib)|$FERRY convert -q -f raw -O qcow2 -c SRC DST|qcow2|qemu-img -t writeback -c (zlib)"
    "qemu-img -t writeback -c (zlib)|qemu-img convert -f raw -O qcow2 -c -t writeback SRC DST|qcow2|"
    "ferry -c (zlib level 6)|FERRY_ZLIB_LEVEL=6 $FERRY convert -q -f raw -O qcow2 -c SRC DST|qcow2|qemu-img -t writeback -c (zlib)"
    "ferry -c (zstd)|$FERRY convert -q -f raw -O qcow2 -c -o compression_type=zstd SRC DST|qcow2|qemu-img -t writeback -c (zstd)"
    "qemu-img -t writeback -c (zstd)|qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd -t writeback SRC DST|qcow2|"
)

guest_image
sync

check_drop_caches
format_table "raw -> qcow2" "qcow2"
