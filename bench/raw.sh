#!/usr/bin/env bash
# raw -> raw on the local filesystem: Ferry against qemu-img convert and cp.
#
# A 1 GiB raw image, half random data and half holes, interleaved (runs of 2 MiB, and some
# stretches of 64 KiB data / 64 KiB hole), is copied by every command below RUNS times. The
# runs are interleaved (one of each command, then again, in an order shuffled afresh each
# round) so that drift in disk speed hits every command alike; before each run the page cache
# is written back and dropped (when permitted). Prints the median time of each command and its
# ratio to the qemu-img command that gives the same guarantee: flushing against flushing,
# unflushed against unflushed.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 BENCH_DIR=/tmp bench/raw.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5
bench_workdir ferry-bench

# name | command (SRC the image, DST the target) | target format | the qemu-img row it is compared with
ROWS=(
    "ferry|$FERRY convert -q -f raw -O raw SRC DST|raw|qemu-img -t writeback"
    "ferry -m 16 -W|$FERRY convert -q -f raw -O raw -m 16 -W SRC DST|raw|qemu-img -t writeback -m 16 -W"
    "ferry -t unsafe|$FERRY convert -q -f raw -O raw -t unsafe SRC DST|raw|qemu-img"
    "ferry -t unsafe -m 16 -W|$FERRY convert -q -f raw -O raw -t unsafe -m 16 -W SRC DST|raw|qemu-img -m 16 -W"
    "qemu-img|qemu-img convert -f raw -O raw SRC DST|raw|"
    "qemu-img -m 16 -W|qemu-img convert -f raw -O raw -m 16 -W SRC DST|raw|"
    "qemu-img -t writeback|qemu-img convert -f raw -O raw -t writeback SRC DST|raw|"
    "qemu-img -t writeback -m 16 -W|qemu-img convert -f raw -O raw -t writeback -m 16 -W SRC DST|raw|"
    "cp --sparse=always|cp --sparse=always SRC DST|raw|qemu-img"
    "cp --sparse=always + sync|cp --sparse=always SRC DST && sync DST|raw|qemu-img -t writeback"
)

echo "bench: building a ${SIZE_MIB} MiB raw image in $OUT (half random data, half holes)" >&2
fill_half_data "$SRC" "$SIZE_MIB"
sync "$SRC"
echo "bench: source: $(du -h --apparent-size "$SRC" | cut -f1) apparent, $(du -h "$SRC" | cut -f1) allocated" >&2

check_drop_caches
DATA="half data" format_table "raw -> raw" ""
