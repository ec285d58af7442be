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

OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/ferry-bench-qcow2w.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
SRC=$OUT/src.raw
DST=$OUT/dst.qcow2

# name | command (SRC is the raw image, DST the target) | the qemu-img row it is compared with
ROWS=(
    "ferry|$FERRY convert -q -f raw -O qcow2 SRC DST|qemu-img -t writeback"
    "qemu-img -t writeback|qemu-img convert -f raw -O qcow2 -t writeback SRC DST|"
    "ferry -c (zlib)|$FERRY convert -q -f raw -O qcow2 -c SRC DST|qemu-img -t writeback -c (zlib)"
    "qemu-img -t writeback -c (zlib)|qemu-img convert -f raw -O qcow2 -c -t writeback SRC DST|"
    "ferry -c (zlib level 6)|FERRY_ZLIB_LEVEL=6 $FERRY convert -q -f raw -O qcow2 -c SRC DST|qemu-img -t writeback -c (zlib)"
    "ferry -c (zstd)|$FERRY convert -q -f raw -O qcow2 -c -o compression_type=zstd SRC DST|qemu-img -t writeback -c (zstd)"
    "qemu-img -t writeback -c (zstd)|qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd -t writeback SRC DST|"
)

CORPUS=$OUT/corpus
make_corpus "$CORPUS"

echo "bench: building a ${SIZE_MIB} MiB guest image in $OUT (half data, half holes)" >&2
fill_half_data "$SRC" "$SIZE_MIB" "$CORPUS"
rm -f "$CORPUS"
sync

check_drop_caches

declare -A TIMES SIZES
for (( run = 1; run <= RUNS; run++ )); do
    mapfile -t ORDER < <(shuffle "$run" "${ROWS[@]}")
    for row in "${ORDER[@]}"; do
        IFS='|' read -r name cmd _ <<<"$row"
        cmd=${cmd//SRC/$SRC}
        cmd=${cmd//DST/$DST}
        rm -f "$DST"
        settle
        t0=$(now_ns)
        bash -c "$cmd"
        t1=$(now_ns)
        TIMES[$name]+="$(( (t1 - t0) / 1000 )) "
        if (( run == 1 )); then
            qemu-img check -q "$DST" || { echo "bench: $name: qemu-img check failed" >&2; exit 1; }
            qemu-img compare -q -f raw -F qcow2 "$SRC" "$DST" || { echo "bench: $name produced a different image" >&2; exit 1; }
            SIZES[$name]=$(( $(stat -c %b "$DST") * 512 / 1048576 ))
        fi
    done
    echo "bench: run $run of $RUNS done" >&2
done
rm -f "$DST"

echo
echo "raw -> qcow2, ${SIZE_MIB} MiB guest image (half data: binaries and text), median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs"
echo
printf '| %-32s | %8s | %7s | %8s | %6s | %-32s |\n' "command" "median s" "MiB/s" "out MiB" "ratio" "ratio is time against"
printf '|%s|%s|%s|%s|%s|%s|\n' "----------------------------------" "----------" "---------" "----------" "--------" "----------------------------------"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name _ ref <<<"$row"
    r=""
    [ -n "$ref" ] && r=$(median_us "${TIMES[$ref]}")
    read -r secs rate ratio <<<"$(row_figures "$(median_us "${TIMES[$name]}")" "$r")"
    against=$ref
    printf '| %-32s | %8s | %7s | %8s | %6s | %-32s |\n' "$name" "$secs" "$rate" "${SIZES[$name]}" "$ratio" "$against"
done
echo
echo "MiB/s is the image's virtual size over the time; out MiB is what the qcow2 file takes on disk; ratio < 1 means faster than the qemu-img command it is compared with."
