#!/usr/bin/env bash
# `ferry compare` against `qemu-img compare` on a half-data pair of images.
#
# A raw guest image (half data from binaries and text, half holes; see fill_half_data), a raw
# copy of it and a qcow2 copy, compared:
#
#   raw / raw          two local raw files
#   raw / qcow2        a local raw file and a local qcow2 image
#   nbd 2ms            both raw images through nbdkit exports that delay every read by 2 ms
#                      (`--filter=delay`), as over a distant link
#
# Local rows start from a cold page cache (settle drops it), so both tools read from disk; the
# "warm" rows read both images into the page cache first (untimed), as they are right after
# the copy that made one of them, so both tools compare from memory.
# The disk's limit for the cold rows: fio reading as many bytes as both images hold data,
# O_DIRECT, 1 MiB at depth 16 (this disk's best), on fio's own clock. Against a tool that takes
# L times the limit's time, no tool can take less than 1/L of its time on those rows.
# Every pair is identical, so both commands read everything they read; the first run checks
# that each says so (exit 0). Runs interleave, in an order shuffled afresh each run; the table
# gives medians and Ferry's time over qemu-img's on the same pair.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 DELAY=2ms bench/compare.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
bench_defaults 5
DELAY=${DELAY:-2ms}
for t in nbdkit qemu-img fio; do
    command -v $t >/dev/null || { echo "bench: $t is missing (scripts/install-deps.sh)" >&2; exit 1; }
done
check_drop_caches
bench_workdir ferry-bench-compare
export FERRY_NBD_DIR=$OUT/nbd
trap '"$HERE/../scripts/nbd-stop.sh" cmp1 cmp2 >/dev/null 2>&1 || true; rm -rf "$OUT"' EXIT

guest_image
COPY=$OUT/copy.raw
QCOPY=$OUT/copy.qcow2
cp --sparse=always "$SRC" "$COPY"
qemu-img convert -f raw -O qcow2 "$SRC" "$QCOPY"
U1=$("$HERE/../scripts/nbd-start.sh" cmp1 unix --filter=delay file "$SRC" delay-read=$DELAY)
U2=$("$HERE/../scripts/nbd-start.sh" cmp2 unix --filter=delay file "$COPY" delay-read=$DELAY)

# pair | tool | command
ROWS=(
    "raw / raw|ferry|$FERRY compare -q -f raw -F raw '$SRC' '$COPY'"
    "raw / raw|qemu-img|qemu-img compare -q -f raw -F raw '$SRC' '$COPY'"
    "raw / qcow2|ferry|$FERRY compare -q -f raw -F qcow2 '$SRC' '$QCOPY'"
    "raw / qcow2|qemu-img|qemu-img compare -q -f raw -F qcow2 '$SRC' '$QCOPY'"
    "raw / raw warm|ferry|$FERRY compare -q -f raw -F raw '$SRC' '$COPY'"
    "raw / raw warm|qemu-img|qemu-img compare -q -f raw -F raw '$SRC' '$COPY'"
    "raw / qcow2 warm|ferry|$FERRY compare -q -f raw -F qcow2 '$SRC' '$QCOPY'"
    "raw / qcow2 warm|qemu-img|qemu-img compare -q -f raw -F qcow2 '$SRC' '$QCOPY'"
    "nbd $DELAY|ferry|$FERRY compare -q -f raw -F raw '$U1' '$U2'"
    "nbd $DELAY|qemu-img|qemu-img compare -q -f raw -F raw '$U1' '$U2'"
)

limit_data 2
ROWS+=("limit|fio|--name=read --ioengine=io_uring --iodepth=16 --direct=1 --rw=read --bs=1M --size=${data_mib}M --filename=$OUT/data.raw")

row() {
    local run=$1 pair tool cmd
    IFS='|' read -r pair tool cmd <<<"$2"
    if [ "$pair" = limit ]; then fio_limit limit "$cmd"; return; fi
    local BENCH_SETTLE=${BENCH_SETTLE:-drop}
    if [[ $pair == *warm ]]; then
        cat "$SRC" "$COPY" "$QCOPY" >/dev/null
        BENCH_SETTLE=none
    fi
    timed "$pair/$tool" "$cmd"
}
run_rounds row

echo
echo "compare, ${SIZE_MIB} MiB guest image (half data: binaries and text) against an identical copy, median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs; page cache dropped before each run except the warm rows'"
echo
printf '| %-16s | %-9s | %8s | %7s | %6s |\n' pair command "median s" "MiB/s" ratio
printf '|%s|%s|%s|%s|%s|\n' "------------------" "-----------" "----------" "---------" "--------"
for pair in "raw / raw" "raw / qcow2" "raw / raw warm" "raw / qcow2 warm" "nbd $DELAY"; do
    for tool in ferry qemu-img; do
        read -r secs rate ratio <<<"$(figures "$pair/$tool" "$pair/qemu-img")"
        printf '| %-16s | %-9s | %8s | %7s | %6s |\n' "$pair" "$tool" "$secs" "$rate" "$ratio"
    done
done
read -r secs _ <<<"$(figures limit)"
printf '| %-16s | %-9s | %8s | %7s | %6s |\n' "disk limit" fio "$secs" "" ""
echo
echo "ratio: the command's median over qemu-img compare's on the same pair (< 1: faster). disk limit: fio reading both images' data (${data_mib} MiB) from this disk, O_DIRECT at depth 16, its own start left out."
echo
printf '| %-16s | %13s | %16s |\n' "cold pair" "ferry / limit" "qemu-img / limit"
printf '|%s|%s|%s|\n' "------------------" "---------------" "------------------"
for pair in "raw / raw" "raw / qcow2"; do
    printf '| %-16s | %13s | %16s |\n' "$pair" "$(figures "$pair/ferry" limit | cut -d' ' -f3)" \
        "$(figures "$pair/qemu-img" limit | cut -d' ' -f3)"
done
