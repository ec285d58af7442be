#!/usr/bin/env bash
# What a verified copy costs: `ferry convert --checksum` against the same copy without it, and
# `ferry checksum` of an image against `sha256sum` of its raw file (and blksum or
# `nbdcopy --blkhash`, where this machine has them).
#
# A raw guest image (half data from binaries and text, half holes; see fill_half_data) and a
# qcow2 copy of it:
#
#   convert          ferry convert raw -> qcow2 (a new local file, flushed)
#   convert --checksum   the same copy, printing the block hash of what it copied
#   checksum raw     ferry checksum of the raw image (its holes are not read)
#   checksum qcow2   ferry checksum of the qcow2 copy
#   sha256sum raw    sha256sum of the raw file (every byte read and hashed)
#
# Every run starts from a cold page cache (settle drops it, when permitted), rows interleave
# in an order shuffled afresh each run, and the first run checks that every digest printed is
# the same. The table gives medians and ratios: --checksum over the plain copy, each checksum
# over sha256sum.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 bench/verify.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5
check_drop_caches
bench_workdir ferry-bench-verify
trap 'rm -rf "$OUT"' EXIT

guest_image
QSRC=$OUT/src.qcow2
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
D1=$OUT/plain.qcow2
D2=$OUT/summed.qcow2

# name | command | reference row
ROWS=(
    "convert|rm -f '$D1'; $FERRY convert -q -f raw -O qcow2 '$SRC' '$D1'|"
    "convert --checksum|rm -f '$D2'; $FERRY convert -q --checksum -f raw -O qcow2 '$SRC' '$D2'|convert"
    "ferry checksum raw|$FERRY checksum -f raw '$SRC'|sha256sum raw"
    "ferry checksum qcow2|$FERRY checksum -f qcow2 '$QSRC'|sha256sum raw"
    "sha256sum raw|sha256sum '$SRC'|"
)
if command -v blksum >/dev/null; then
    ROWS+=("blksum raw|blksum '$SRC'|sha256sum raw")
fi
if nbdcopy --help 2>&1 | grep -q blkhash; then
    ROWS+=("nbdcopy --blkhash raw|nbdcopy --blkhash '$SRC' null:|sha256sum raw")
fi

# The digests agree before anything is timed.
digests=$("$FERRY" convert -q --checksum -f raw -O qcow2 "$SRC" "$OUT/check.qcow2" | cut -d' ' -f1)
digests+=" $("$FERRY" checksum -f raw "$SRC" | cut -d' ' -f1)"
digests+=" $("$FERRY" checksum -f qcow2 "$QSRC" | cut -d' ' -f1)"
digests+=" $("$FERRY" checksum -f qcow2 "$OUT/check.qcow2" | cut -d' ' -f1)"
if command -v blksum >/dev/null; then digests+=" $(blksum "$SRC" | cut -d' ' -f1)"; fi
rm -f "$OUT/check.qcow2"
[ "$(tr ' ' '\n' <<<"$digests" | sort -u | wc -l)" = 1 ] || { echo "bench: the digests differ: $digests" >&2; exit 1; }

row() {
    local name cmd ref
    IFS='|' read -r name cmd ref <<<"$2"
    timed "$name" "$cmd"
}
run_rounds row

echo
echo "Verified copies, ${SIZE_MIB} MiB guest image (half data: binaries and text), median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs, cold page cache"
echo
printf '| %-22s | %8s | %7s | %6s | %6s | %-22s |\n' command "median s" "MiB/s" ratio paired "ratio is time against"
printf '|%s|%s|%s|%s|%s|%s|\n' "------------------------" "----------" "---------" "--------" "--------" "------------------------"
for r in "${ROWS[@]}"; do
    IFS='|' read -r name cmd ref <<<"$r"
    read -r secs rate ratio <<<"$(figures "$name" "$ref")"
    paired=""
    [ -z "$ref" ] || paired=$(paired_ratio "$name" "$ref")
    printf '| %-22s | %8s | %7s | %6s | %6s | %-22s |\n' "$name" "$secs" "$rate" "${ratio:-}" "$paired" "$ref"
done
echo
echo "ratio: the median over the reference's median; paired: the median of the two commands' ratios run by run (see paired_ratio in bench/lib/common.sh)."
echo "MiB/s is the image's virtual size over the time. Digest: blkhash, SHA-256, 64 KiB blocks (the same from every row that prints one)."
