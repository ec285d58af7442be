#!/usr/bin/env bash
# make demo: builds a 4 GiB sparse raw image with a few hundred MiB of data scattered in it,
# converts it with Ferry showing progress and the summary, and checks the result with qemu-img.
#
#   scripts/demo.sh FERRY_BINARY [WORK_DIR]
set -euo pipefail

FERRY=${1:?usage: demo.sh FERRY_BINARY [WORK_DIR]}
DIR=${2:-/tmp/ferry-demo}
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
SRC=$DIR/disk.raw
DST=$DIR/copy.raw

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "A 4 GiB sparse raw image with 384 MiB of data in 24 runs (qemu-img create + qemu-io)"
qemu-img create -q -f raw "$SRC" 4G
writes=()
for i in $(seq 0 23); do
    # Runs of 16 MiB spread over the disk, each with its own byte pattern; every fourth run
    # is written as zeros, which Ferry detects and leaves unwritten.
    off=$(( i * 170 + (i % 5) * 7 ))M
    if (( i % 4 == 3 )); then pat=0; else pat=$(( (i * 37 + 1) % 255 + 1 )); fi
    writes+=(-c "write -q -P $pat $off 16M")
done
qemu-io -f raw "${writes[@]}" "$SRC"
ls -lhs "$SRC"

step "ferry convert -p -f raw -O raw disk.raw copy.raw"
"$FERRY" convert -p -f raw -O raw "$SRC" "$DST"

step "ferry info copy.raw"
"$FERRY" info -f raw "$DST"

step "ferry map copy.raw (first lines)"
"$FERRY" map -f raw "$DST" > "$DIR/map.txt"
head -8 "$DIR/map.txt"

step "qemu-img compare -f raw -F raw disk.raw copy.raw"
qemu-img compare -f raw -F raw "$SRC" "$DST"
ls -lhs "$SRC" "$DST"
