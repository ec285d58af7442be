#!/usr/bin/env bash
# QED on the local filesystem: Ferry against qemu-img convert.
#
# A raw guest image of SIZE_MIB, half data and half holes (the corpus of
# bench/qcow2-write.sh), and a qcow2 copy of it, are converted to QED; and a QED image made
# from it by qemu-img is converted back to raw and to qcow2. Each by Ferry and by qemu-img,
# RUNS times, interleaved in an order shuffled afresh each round; the page cache is written
# back and dropped before each run (when permitted). Prints the median time of each command,
# the size of what it wrote and its ratio to the qemu-img command it is compared with (both
# flush: ferry's default against qemu-img -t writeback). Every output is checked with
# qemu-img compare (and qed and qcow2 with qemu-img check) on the first run.
#
# KIND=write (or read) keeps only the rows that write (read) QED.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 KIND=write BENCH_DIR=/tmp bench/qed.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5

bench_workdir ferry-bench-qed
QSRC=$OUT/src.qcow2
QED=$OUT/src.qed

# kind | name | command (SRC the raw image, DST the target) | target format | the qemu-img row it is compared with
conversion_rows "qed|-O qed|qed" -- "qed|-f qed $QED"
select_rows

guest_image
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
if [ "$KIND" != write ]; then
    qemu-img convert -f raw -O qed "$SRC" "$QED"
fi
sync

check_drop_caches

format_table "QED" "qcow2 qed"
