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

OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/ferry-bench.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
SRC=$OUT/src.raw
DST=$OUT/dst.raw

# name | command (DST is the target) | the qemu-img row it is compared with
ROWS=(
    "ferry|$FERRY convert -q -f raw -O raw SRC DST|qemu-img -t writeback"
    "ferry -m 16 -W|$FERRY convert -q -f raw -O raw -m 16 -W SRC DST|qemu-img -t writeback -m 16 -W"
    "ferry -t unsafe|$FERRY convert -q -f raw -O raw -t unsafe SRC DST|qemu-img"
    "ferry -t unsafe -m 16 -W|$FERRY convert -q -f raw -O raw -t unsafe -m 16 -W SRC DST|qemu-img -m 16 -W"
    "qemu-img|qemu-img convert -f raw -O raw SRC DST|"
    "qemu-img -m 16 -W|qemu-img convert -f raw -O raw -m 16 -W SRC DST|"
    "qemu-img -t writeback|qemu-img convert -f raw -O raw -t writeback SRC DST|"
    "qemu-img -t writeback -m 16 -W|qemu-img convert -f raw -O raw -t writeback -m 16 -W SRC DST|"
    "cp --sparse=always|cp --sparse=always SRC DST|qemu-img"
    "cp --sparse=always + sync|cp --sparse=always SRC DST && sync DST|qemu-img -t writeback"
)

echo "bench: building a ${SIZE_MIB} MiB raw image in $OUT (half random data, half holes)" >&2
fill_half_data "$SRC" "$SIZE_MIB"
sync "$SRC"
echo "bench: source: $(du -h --apparent-size "$SRC" | cut -f1) apparent, $(du -h "$SRC" | cut -f1) allocated" >&2

check_drop_caches

declare -A TIMES
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
            qemu-img compare -q -f raw -F raw "$SRC" "$DST" || { echo "bench: $name produced a different image" >&2; exit 1; }
        fi
    done
    echo "bench: run $run of $RUNS done" >&2
done
rm -f "$DST"

echo
echo "raw -> raw, ${SIZE_MIB} MiB image (half data), median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs"
echo
printf '| %-30s | %8s | %7s | %6s | %-30s |\n' "command" "median s" "MiB/s" "ratio" "ratio is time against"
printf '|%s|%s|%s|%s|%s|\n' "--------------------------------" "----------" "---------" "--------" "--------------------------------"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name _ ref <<<"$row"
    r=""
    [ -n "$ref" ] && r=$(median_us "${TIMES[$ref]}")
    read -r secs rate ratio <<<"$(row_figures "$(median_us "${TIMES[$name]}")" "$r")"
    against=$ref
    printf '| %-30s | %8s | %7s | %6s | %-30s |\n' "$name" "$secs" "$rate" "$ratio" "$against"
done
echo
echo "MiB/s is the image's virtual size over the time; ratio < 1 means faster than the qemu-img command it is compared with."
