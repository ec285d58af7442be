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

OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/ferry-bench-qcow2.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
SRC=$OUT/src.raw
DST=$OUT/dst.raw

# name | command (SRC is the image, DST the target) | the qemu-img row it is compared with
ROWS=(
    "ferry|$FERRY convert -q -O raw SRC DST|qemu-img -t writeback"
    "ferry -m 16 -W|$FERRY convert -q -O raw -m 16 -W SRC DST|qemu-img -t writeback -m 16 -W"
    "ferry -t unsafe|$FERRY convert -q -O raw -t unsafe SRC DST|qemu-img"
    "ferry -t unsafe -m 16 -W|$FERRY convert -q -O raw -t unsafe -m 16 -W SRC DST|qemu-img -m 16 -W"
    "qemu-img|qemu-img convert -O raw SRC DST|"
    "qemu-img -m 16 -W|qemu-img convert -O raw -m 16 -W SRC DST|"
    "qemu-img -t writeback|qemu-img convert -O raw -t writeback SRC DST|"
    "qemu-img -t writeback -m 16 -W|qemu-img convert -O raw -t writeback -m 16 -W SRC DST|"
)
IMAGES=(plain zlib zstd)

CORPUS=$OUT/corpus
make_corpus "$CORPUS"

echo "bench: building a ${SIZE_MIB} MiB guest image in $OUT (half data, half holes)" >&2
fill_half_data "$SRC" "$SIZE_MIB" "$CORPUS"
rm -f "$CORPUS"
qemu-img convert -f raw -O qcow2 "$SRC" "$OUT/plain.qcow2"
echo "bench: compressing with zlib and zstd" >&2
qemu-img convert -f raw -O qcow2 -c -o compression_type=zlib "$SRC" "$OUT/zlib.qcow2"
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$SRC" "$OUT/zstd.qcow2"
sync
for img in "${IMAGES[@]}"; do
    echo "bench: $img.qcow2: $(du -h "$OUT/$img.qcow2" | cut -f1) allocated" >&2
done

check_drop_caches

declare -A TIMES
for (( run = 1; run <= RUNS; run++ )); do
    for img in "${IMAGES[@]}"; do
        mapfile -t ORDER < <(shuffle "$run" "${ROWS[@]}")
        for row in "${ORDER[@]}"; do
            IFS='|' read -r name cmd _ <<<"$row"
            cmd=${cmd//SRC/$OUT/$img.qcow2}
            cmd=${cmd//DST/$DST}
            rm -f "$DST"
            settle
            t0=$(now_ns)
            bash -c "$cmd"
            t1=$(now_ns)
            TIMES[$img/$name]+="$(( (t1 - t0) / 1000 )) "
            if (( run == 1 )); then
                qemu-img compare -q -f raw -F raw "$SRC" "$DST" || { echo "bench: $name on $img.qcow2 produced a different image" >&2; exit 1; }
            fi
        done
    done
    echo "bench: run $run of $RUNS done" >&2
done
rm -f "$DST"

echo
echo "qcow2 -> raw, ${SIZE_MIB} MiB guest image (half data: binaries and text), median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs"
echo
printf '| %-6s | %-30s | %8s | %7s | %6s | %-30s |\n' "image" "command" "median s" "MiB/s" "ratio" "ratio is time against"
printf '|%s|%s|%s|%s|%s|%s|\n' "--------" "--------------------------------" "----------" "---------" "--------" "--------------------------------"
for img in "${IMAGES[@]}"; do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name _ ref <<<"$row"
        r=""
        [ -n "$ref" ] && r=$(median_us "${TIMES[$img/$ref]}")
        read -r secs rate ratio <<<"$(row_figures "$(median_us "${TIMES[$img/$name]}")" "$r")"
        against=$ref
        printf '| %-6s | %-30s | %8s | %7s | %6s | %-30s |\n' "$img" "$name" "$secs" "$rate" "$ratio" "$against"
    done
done
echo
echo "MiB/s is the image's virtual size over the time; ratio < 1 means faster than the qemu-img command it is compared with."
