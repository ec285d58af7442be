#!/usr/bin/env bash
# qcow2 -> raw on the local filesystem: Ferry against qemu-img convert.
#
# A 1 GiB guest image, half data and half holes, is stored three ways: a plain qcow2, and the
# same compressed with zlib (deflate) and with zstd (`qemu-img convert -c -o
# compression_type=...`). The data is realistic and partly compressible: binaries from
# /usr/bin and /usr/lib and text from /usr/share and /usr/include, not random bytes. Each
# image is converted to raw by every command below RUNS times. The runs are interleaved (one
# of each command, then again) so that drift in disk speed hits every command alike; before
# each run the page cache is written back and dropped (when permitted). Prints the median
# time of each command and its ratio to the qemu-img command that gives the same guarantee:
# flushing against flushing (ferry's default against qemu-img -t writeback), unflushed
# against unflushed (ferry -t unsafe against qemu-img's default).
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 BENCH_DIR=/tmp bench/qcow2.sh
set -euo pipefail

FERRY=${FERRY:-$(swift build -c release --show-bin-path)/ferry}
RUNS=${RUNS:-5}
SIZE_MIB=${SIZE_MIB:-1024}
[ -x "$FERRY" ] || { echo "bench: no ferry binary at $FERRY (make release)" >&2; exit 1; }
(( SIZE_MIB % 4 == 0 && SIZE_MIB >= 8 )) || { echo "bench: SIZE_MIB must be a multiple of 4, at least 8" >&2; exit 1; }

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

# A corpus of real bytes: binaries and libraries, then text.
CORPUS=$OUT/corpus
CORPUS_MIB=96
echo "bench: gathering ${CORPUS_MIB} MiB of binaries and text" >&2
{
    find /usr/bin /usr/lib -type f -size +16k 2>/dev/null | sort | head -n 4000 | xargs cat 2>/dev/null | head -c $(( CORPUS_MIB * 1024 * 1024 * 2 / 3 )) || true
    for (( pass = 0; pass < 16; pass++ )); do
        find /usr/share /usr/include -type f \( -name '*.h' -o -name '*.txt' -o -name '*.html' -o -name '*.py' -o -name '*.pl' -o -name '*.xml' \) 2>/dev/null | sort | xargs cat 2>/dev/null || true
    done | head -c $(( CORPUS_MIB * 1024 * 1024 / 3 )) || true
} > "$CORPUS"
corpus_mib=$(( $(stat -c %s "$CORPUS") / 1048576 ))
(( corpus_mib >= 8 )) || { echo "bench: could not gather enough data for the corpus" >&2; exit 1; }

echo "bench: building a ${SIZE_MIB} MiB guest image in $OUT (half data, half holes)" >&2
truncate -s "${SIZE_MIB}M" "$SRC"
slots=$(( SIZE_MIB / 4 ))
for (( k = 0; k < slots; k++ )); do
    base=$(( k * 4096 ))   # KiB
    if (( k % 8 == 7 )); then
        # 32 runs of 64 KiB data, each followed by 64 KiB of hole.
        for (( j = 0; j < 32; j++ )); do
            dd if="$CORPUS" of="$SRC" bs=64K count=1 skip=$(( (k * 32 + j) % (corpus_mib * 16) )) \
               seek=$(( (base + j * 128) / 64 )) conv=notrunc status=none
        done
    else
        # 2 MiB of data at 0, 1 or 2 MiB into the 4 MiB slot.
        dd if="$CORPUS" of="$SRC" bs=1M count=2 skip=$(( (k * 2) % (corpus_mib - 2) )) \
           seek=$(( base / 1024 + k % 3 )) conv=notrunc status=none
    fi
done
rm -f "$CORPUS"
qemu-img convert -f raw -O qcow2 "$SRC" "$OUT/plain.qcow2"
echo "bench: compressing with zlib and zstd" >&2
qemu-img convert -f raw -O qcow2 -c -o compression_type=zlib "$SRC" "$OUT/zlib.qcow2"
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$SRC" "$OUT/zstd.qcow2"
sync
for img in "${IMAGES[@]}"; do
    echo "bench: $img.qcow2: $(du -h "$OUT/$img.qcow2" | cut -f1) allocated" >&2
done

settle() {
    sync
    { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || true
}
if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
    echo "bench: cannot drop the page cache (not root?): reads may come from memory" >&2
fi

now_ns() { date +%s%N; }

declare -A TIMES
for (( run = 1; run <= RUNS; run++ )); do
    for img in "${IMAGES[@]}"; do
        for row in "${ROWS[@]}"; do
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

median_us() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

echo
echo "qcow2 -> raw, ${SIZE_MIB} MiB guest image (half data: binaries and text), median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs"
echo
printf '| %-6s | %-30s | %8s | %7s | %6s | %-30s |\n' "image" "command" "median s" "MiB/s" "ratio" "ratio is time against"
printf '|%s|%s|%s|%s|%s|%s|\n' "--------" "--------------------------------" "----------" "---------" "--------" "--------------------------------"
for img in "${IMAGES[@]}"; do
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name _ ref <<<"$row"
        m=$(median_us "${TIMES[$img/$name]}")
        secs=$(awk -v m="$m" 'BEGIN { printf "%.3f", m / 1e6 }')
        rate=$(awk -v m="$m" -v s="$SIZE_MIB" 'BEGIN { printf "%.0f", s / (m / 1e6) }')
        ratio="" against=""
        if [ -n "$ref" ]; then
            r=$(median_us "${TIMES[$img/$ref]}")
            ratio=$(awk -v m="$m" -v r="$r" 'BEGIN { printf "%.2f", m / r }')
            against=$ref
        fi
        printf '| %-6s | %-30s | %8s | %7s | %6s | %-30s |\n' "$img" "$name" "$secs" "$rate" "$ratio" "$against"
    done
done
echo
echo "MiB/s is the image's virtual size over the time; ratio < 1 means faster than the qemu-img command it is compared with."
