#!/usr/bin/env bash
# qcow2 -> raw on the local filesystem: Ferry against qemu-img convert.
#
# A 1 GiB guest image, half data and half holes, is stored three ways: a plain qcow2, and the
# same compressed with zlib (deflate) and with zstd (`qemu-img convert -c -o
# compression_type=...`). The data is realistic and partly compressible: binaries from
# /usr/bin and /usr/lib and text from /usr/share and /usr/include, not random bytes. Each
# image is converted to raw by every command below RUNS times. The runs are interleaved (one
# of each command, then again, in an order shuffled afresh each round) so that drift in disk speed
# hits every command alike; before each run the page cache is written back and dropped (when
# permitted). Prints the median
# time of each command and its ratio to the qemu-img command that gives the same guarantee:
# flushing against flushing (ferry's default against qemu-img -t writeback), unflushed
# against unflushed (ferry -t unsafe against qemu-img's default).
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 BENCH_DIR=/tmp bench/qcow2.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5
bench_workdir ferry-bench-qcow2

# name | command (IMG is the qcow2 image, DST the target) | the qemu-img row it is compared with
COMMANDS=(
    "ferry|$FERRY convert -q -O raw IMG DST|qemu-img -t writeback"
    "ferry -m 16 -W|$FERRY convert -q -O raw -m 16 -W IMG DST|qemu-img -t writeback -m 16 -W"
    "ferry -t unsafe|$FERRY convert -q -O raw -t unsafe IMG DST|qemu-img"
    "ferry -t unsafe -m 16 -W|$FERRY convert -q -O raw -t unsafe -m 16 -W IMG DST|qemu-img -m 16 -W"
    "qemu-img|qemu-img convert -O raw IMG DST|"
    "qemu-img -m 16 -W|qemu-img convert -O raw -m 16 -W IMG DST|"
    "qemu-img -t writeback|qemu-img convert -O raw -t writeback IMG DST|"
    "qemu-img -t writeback -m 16 -W|qemu-img convert -O raw -t writeback -m 16 -W IMG DST|"
)
IMAGES=(plain zlib zstd)
# Every command on every image: "image: name|command|raw|image: reference".
ROWS=()
for img in "${IMAGES[@]}"; do
    for c in "${COMMANDS[@]}"; do
        IFS='|' read -r name cmd ref <<<"$c"
        ROWS+=("$img: $name|${cmd//IMG/$OUT/$img.qcow2}|raw|${ref:+$img: $ref}")
    done
done

guest_image
qemu-img convert -f raw -O qcow2 "$SRC" "$OUT/plain.qcow2"
echo "bench: compressing with zlib and zstd" >&2
qemu-img convert -f raw -O qcow2 -c -o compression_type=zlib "$SRC" "$OUT/zlib.qcow2"
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$SRC" "$OUT/zstd.qcow2"
sync
for img in "${IMAGES[@]}"; do
    echo "bench: $img.qcow2: $(du -h "$OUT/$img.qcow2" | cut -f1) allocated" >&2
done

check_drop_caches
format_table "qcow2 -> raw" ""
