#!/usr/bin/env bash
# A large qcow2 whose metadata is most of the work, on the local filesystem: Ferry against
# qemu-img convert.
#
# A 1 TiB guest image holds 4,096 runs of 64 KiB of random bytes, one every 256 MiB, so every
# one of its 2,048 L2 tables is in use (the qcow2 takes about 384 MiB, half of it L2 tables).
# It is converted to raw and to qcow2 by Ferry and by qemu-img, RUNS times, interleaved in an
# order shuffled afresh each round, the page cache written back and dropped before each run
# (when permitted). Both flush (Ferry's default against qemu-img -t writeback). Every output is
# checked with qemu-img compare (and qcow2 with qemu-img check) on the first run.
#
# This is the copy that waited longest before its first byte while Ferry counted the data
# to copy before copying it: the count alone reads every L2 table.
#
#   FERRY=path/to/ferry RUNS=5 BENCH_DIR=/tmp bench/scattered.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

SIZE_MIB=$((1024 * 1024))
bench_defaults 5
bench_workdir ferry-bench-scattered
QSRC=$OUT/src.qcow2
DATA="4,096 runs of 64 KiB, one every 256 MiB"

ROWS=()
for f in raw qcow2; do
    ROWS+=("ferry qcow2 -> $f|$FERRY convert -q -f qcow2 $QSRC -O $f DST|$f|qemu-img qcow2 -> $f"
           "ferry -m 16 -W qcow2 -> $f|$FERRY convert -q -f qcow2 $QSRC -O $f -m 16 -W DST|$f|qemu-img -m 16 -W qcow2 -> $f"
           "qemu-img qcow2 -> $f|qemu-img convert -f qcow2 $QSRC -O $f -t writeback DST|$f|"
           "qemu-img -m 16 -W qcow2 -> $f|qemu-img convert -f qcow2 $QSRC -O $f -t writeback -m 16 -W DST|$f|")
done

echo "bench: building a 1 TiB image in $OUT ($DATA)" >&2
truncate -s 1T "$SRC"
python3 - "$SRC" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
for i in range(4096):
    os.pwrite(fd, os.urandom(65536), i * (256 << 20) + (i % 7) * 65536)
os.close(fd)
EOF
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
sync
echo "bench: src.qcow2: $(du -h "$QSRC" | cut -f1) allocated" >&2

check_drop_caches

format_table "Scattered qcow2" "qcow2"
