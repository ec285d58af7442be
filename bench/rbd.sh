#!/usr/bin/env bash
# Into and out of Ceph RBD: Ferry against qemu-img convert (its default and -m 16 -W) and
# against `rbd import` / `rbd export`, on a one-node cluster started by scripts/ceph-start.sh
# (one bluestore OSD on a sparse file, loopback).
#
# A raw image of SIZE_MIB, half random data and half holes (bench/raw.sh's layout), and its
# qcow2 copy, go into a new RBD image and a raw RBD image comes back out to a local raw or
# qcow2 file. Every command runs RUNS times, interleaved in an order shuffled afresh each
# round; the target image is removed between runs, and the page cache written back and
# dropped before each (when permitted). The table gives each command's median and, for every
# other row, Ferry's default time over that row's in the same direction (below 1: Ferry is
# faster). librbd flushes its cache when an image closes, so every row ends with the data in
# the OSD: like is compared with like.
#
# Then, for scale: 1, 2 and 4 conversions of the raw image into the cluster at once, one
# process per image (how Ferry is meant to be run across hosts), total time and throughput.
#
#   FERRY=path/to/ferry RUNS=3 SIZE_MIB=1024 BENCH_DIR=/tmp bench/rbd.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
bench_defaults 3
qemu-img --help | grep -qw rbd || { echo "bench: qemu-img has no rbd driver (install qemu-block-extra)" >&2; exit 1; }
bench_workdir ferry-bench-rbd
STATE=$OUT/ceph
trap '"$HERE/../scripts/ceph-stop.sh" "$STATE" >/dev/null 2>&1 || true; rm -rf "$OUT"' EXIT
echo "bench: starting a one-node Ceph cluster" >&2
CEPH_MON_PORT=${CEPH_MON_PORT:-19500} "$HERE/../scripts/ceph-start.sh" "$STATE" >/dev/null
CONF=$STATE/ceph.conf
POOL=rbdpool
RBD=(rbd -c "$CONF")
url() { echo "rbd:$POOL/$1:conf=$CONF"; }

echo "bench: building a ${SIZE_MIB} MiB raw image (half random data, half holes) and its qcow2 copy" >&2
fill_half_data "$SRC" "$SIZE_MIB"
QSRC=$OUT/src.qcow2
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
# The image the out-of-cluster rows read, put there by rbd import (not by Ferry).
"${RBD[@]}" import --no-progress "$SRC" "$POOL/source" >/dev/null

# direction | name | command (TGT: the new RBD image; LOCAL: a local target) | local format
ROWS=(
    "in|ferry raw -> rbd|$FERRY convert -q -f raw -O raw $SRC TGT|"
    "in|ferry qcow2 -> rbd|$FERRY convert -q -f qcow2 -O raw $QSRC TGT|"
    "in|qemu-img raw -> rbd|qemu-img convert -f raw -O raw $SRC TGT|"
    "in|qemu-img -m 16 -W raw -> rbd|qemu-img convert -m 16 -W -f raw -O raw $SRC TGT|"
    "in|qemu-img qcow2 -> rbd|qemu-img convert -f qcow2 -O raw $QSRC TGT|"
    "in|qemu-img -m 16 -W qcow2 -> rbd|qemu-img convert -m 16 -W -f qcow2 -O raw $QSRC TGT|"
    "in|rbd import raw|rbd -c $CONF import --no-progress $SRC IMG|"
    "out|ferry rbd -> raw|$FERRY convert -q -f raw -O raw $(url source) LOCAL|raw"
    "out|ferry rbd -> qcow2|$FERRY convert -q -f raw -O qcow2 $(url source) LOCAL|qcow2"
    "out|qemu-img rbd -> raw|qemu-img convert -t writeback -f raw -O raw $(url source) LOCAL|raw"
    "out|qemu-img -m 16 -W rbd -> raw|qemu-img convert -t writeback -m 16 -W -f raw -O raw $(url source) LOCAL|raw"
    "out|qemu-img rbd -> qcow2|qemu-img convert -t writeback -f raw -O qcow2 $(url source) LOCAL|qcow2"
    "out|rbd export|rbd -c $CONF export --no-progress $POOL/source LOCAL && sync LOCAL|raw"
)

rbd_row() {
    local run=$1 dir name cmd fmt img local
    IFS='|' read -r dir name cmd fmt <<<"$2"
    img=dst-$run
    local=$DST.${fmt:-raw}
    cmd=${cmd//TGT/$(url "$img")}
    cmd=${cmd//IMG/$POOL/$img}
    cmd=${cmd//LOCAL/$local}
    rm -f "$local"
    timed "$name" "$cmd"
    if (( run == 1 )); then
        if [ "$dir" = in ]; then
            qemu-img compare -q -f raw -F raw "$SRC" "$(url "$img")" || { echo "bench: $name: different data in the cluster" >&2; exit 1; }
        else
            qemu-img compare -q -f raw -F "$fmt" "$SRC" "$local" || { echo "bench: $name: different data" >&2; exit 1; }
        fi
    fi
    [ "$dir" = in ] && "${RBD[@]}" rm --no-progress "$POOL/$img" >/dev/null
    rm -f "$local"
}

check_drop_caches
run_rounds rbd_row

echo
echo "Ceph RBD (Pacific, one bluestore OSD, loopback), ${SIZE_MIB} MiB image (half data), median of $RUNS runs, $(uname -r), $(nproc) CPUs"
echo
printf '| %-34s | %8s | %7s | %-28s |\n' "command" "median s" "MiB/s" "ferry default / this row"
printf '|%s|%s|%s|%s|\n' "------------------------------------" "----------" "---------" "------------------------------"
for row in "${ROWS[@]}"; do
    IFS='|' read -r dir name _ fmt <<<"$row"
    read -r secs rate _ <<<"$(figures "$name")"
    case "$name" in
        "ferry raw -> rbd"|"ferry qcow2 -> rbd"|"ferry rbd -> raw"|"ferry rbd -> qcow2") ratio="" ;;
        *)
            # Ferry's default row for the same source (in) or target (out) format.
            if [ "$dir" = in ]; then
                [[ $name == *qcow2* ]] && ferry="ferry qcow2 -> rbd" || ferry="ferry raw -> rbd"
            else
                [ "$fmt" = qcow2 ] && ferry="ferry rbd -> qcow2" || ferry="ferry rbd -> raw"
            fi
            read -r _ _ ratio <<<"$(figures "$ferry" "$name")"
            ratio="$ratio ($ferry)" ;;
    esac
    printf '| %-34s | %8s | %7s | %-28s |\n' "$name" "$secs" "$rate" "$ratio"
done

# Scale: N processes, each converting the raw image into an image of its own, at once.
echo
echo "Concurrent conversions into the same cluster (one ferry process per image), median of $RUNS runs"
echo
printf '| %-12s | %8s | %15s | %-22s |\n' "conversions" "median s" "total MiB/s" "throughput against one"
printf '|%s|%s|%s|%s|\n' "--------------" "----------" "-----------------" "------------------------"
declare -A AGG
for n in 1 2 4; do
    for (( run = 1; run <= RUNS; run++ )); do
        settle
        t0=$(now_ns)
        pids=()
        for (( i = 0; i < n; i++ )); do
            "$FERRY" convert -q -f raw -O raw "$SRC" "$(url "par-$n-$i")" & pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || { echo "bench: a concurrent conversion failed" >&2; exit 1; }; done
        t1=$(now_ns)
        TIMES[par$n]+="$(( (t1 - t0) / 1000 )) "
        for (( i = 0; i < n; i++ )); do "${RBD[@]}" rm --no-progress "$POOL/par-$n-$i" >/dev/null; done
    done
    m=$(median_us "${TIMES[par$n]}")
    AGG[$n]=$(awk -v m="$m" -v s="$SIZE_MIB" -v n="$n" 'BEGIN { printf "%.0f", n * s / (m / 1e6) }')
    printf '| %-12s | %8s | %15s | %-22s |\n' "$n" "$(awk -v m="$m" 'BEGIN { printf "%.3f", m / 1e6 }')" "${AGG[$n]}" \
        "$(awk -v a="${AGG[$n]}" -v b="${AGG[1]}" 'BEGIN { printf "%.2f", a / b }')"
done
echo
echo "MiB/s is the image's virtual size over the time (total: every image's). Below 1 in the first table: Ferry's default took less time than that row."
