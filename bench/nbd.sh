#!/usr/bin/env bash
# NBD copies where latency rules: Ferry against qemu-img convert and nbdcopy.
#
# A 1 GiB raw image, half random data and half holes (2 MiB of each in turn), is served by
# nbdkit's file plugin on a unix socket with `--filter=delay delay-read=2ms` (every read
# command waits 2 ms, as over a distant link). Three copies:
#
#   nbd -> local      the delayed export to a local raw file
#   nbd 256K -> local the same with the server's maximum request capped at 256 KiB
#                     (blocksize-policy; requests above it are refused), as many servers do
#   nbd -> nbd        the delayed export to `nbdkit memory 1G`
#
# Every command flushes the target at the end (like with like): Ferry by default,
# qemu-img with `-t writeback`, nbdcopy with `--flush`. Runs are interleaved (one of each
# command, then again, in an order shuffled afresh each run) so drift hits all alike; the
# table gives medians and each command's time over Ferry's default in the same copy
# (ratio > 1: Ferry's default is faster).
#
#   FERRY=path/to/ferry RUNS=3 SIZE_MIB=1024 DELAY=2ms BENCH_DIR=/dev/shm bench/nbd.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
bench_defaults 3
DELAY=${DELAY:-2ms}
for t in nbdkit nbdcopy qemu-img; do
    command -v $t >/dev/null || { echo "bench: $t is missing (scripts/install-deps.sh)" >&2; exit 1; }
done

# tmpfs by default, so the local target's disk does not hide the network latency.
BASE=${BENCH_DIR:-/dev/shm}
[ -w "$BASE" ] || BASE=/tmp
OUT=$(mktemp -d "$BASE/ferry-bench-nbd.XXXXXX")
export FERRY_NBD_DIR=$OUT/nbd
cleanup() {
    "$HERE/../scripts/nbd-stop.sh" src src256 dst >/dev/null 2>&1 || true
    rm -rf "$OUT"
}
trap cleanup EXIT
SRC=$OUT/src.raw
DST=$OUT/dst.raw

echo "bench: building a ${SIZE_MIB} MiB raw image in $OUT (half random data, half holes)" >&2
truncate -s "${SIZE_MIB}M" "$SRC"
for (( k = 0; k < SIZE_MIB / 4; k++ )); do
    dd if=/dev/urandom of="$SRC" bs=2M count=1 seek=$(( k * 2 )) conv=notrunc status=none
done

S=$("$HERE/../scripts/nbd-start.sh" src unix --filter=delay file "$SRC" delay-read=$DELAY)
S256=$("$HERE/../scripts/nbd-start.sh" src256 unix --filter=blocksize-policy --filter=delay file "$SRC" \
    blocksize-maximum=256K blocksize-error-policy=error delay-read=$DELAY)
D=$("$HERE/../scripts/nbd-start.sh" dst unix memory "${SIZE_MIB}M")

# copy | name | command (SRC/DST/URL substituted)
ROWS=()
add_copy() {   # copy-name source-url target target-is-nbd
    local c=$1 s=$2 t=$3 n=""
    [ "$4" = yes ] && n="-n"
    ROWS+=(
        "$c|ferry|$FERRY convert -q -f raw -O raw $n '$s' '$t'"
        "$c|ferry -m 16 -W|$FERRY convert -q -f raw -O raw $n -m 16 -W '$s' '$t'"
        "$c|qemu-img -t writeback -m 1|qemu-img convert -t writeback -f raw -O raw $n -m 1 '$s' '$t'"
        "$c|qemu-img -t writeback|qemu-img convert -t writeback -f raw -O raw $n '$s' '$t'"
        "$c|qemu-img -t writeback -m 16 -W|qemu-img convert -t writeback -f raw -O raw $n -m 16 -W '$s' '$t'"
        "$c|nbdcopy --flush|nbdcopy --flush '$s' '$t'"
    )
}
add_copy "nbd -> local" "$S" "$DST" no
add_copy "nbd 256K -> local" "$S256" "$DST" no
add_copy "nbd -> nbd" "$S" "$D" yes

# The source and the targets live in memory: nothing to settle between runs.
BENCH_SETTLE=none
nbd_row() {   # RUN ROW
    local run=$1 copy name cmd t
    IFS='|' read -r copy name cmd <<<"$2"
    rm -f "$DST"
    timed "$copy/$name" "$cmd"
    if (( run == 1 )); then  # check every command's result once
        case $copy in *nbd) t=$D ;; *) t=$DST ;; esac
        qemu-img compare -q -f raw -F raw "$SRC" "$t" || { echo "bench: $copy: $name produced a different image" >&2; exit 1; }
    fi
}
run_rounds nbd_row

echo
echo "NBD with ${DELAY} per read command, ${SIZE_MIB} MiB image (half data), median of $RUNS runs, $(nproc) CPUs; every command flushes the target"
echo
printf '| %-18s | %-30s | %8s | %7s | %13s |\n' "copy" "command" "median s" "MiB/s" "x ferry time"
printf '|%s|%s|%s|%s|%s|\n' "--------------------" "--------------------------------" "----------" "---------" "---------------"
for row in "${ROWS[@]}"; do
    IFS='|' read -r copy name _ <<<"$row"
    read -r secs rate ratio <<<"$(figures "$copy/$name" "$copy/ferry")"
    printf '| %-18s | %-30s | %8s | %7s | %13s |\n' "$copy" "$name" "$secs" "$rate" "$ratio"
done
echo
echo "x ferry time: the command's median over Ferry's default median in the same copy (> 1: Ferry's default is faster)."
