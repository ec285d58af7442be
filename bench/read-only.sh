#!/usr/bin/env bash
# The formats Ferry reads but does not write, that qemu-img can make (Parallels), on the
# local filesystem: Ferry against qemu-img convert. (cloop, Bochs and dmg, which qemu-img
# cannot make, are judged in the tests only; QED, which Ferry writes too, is bench/qed.sh.)
#
# A raw guest image of SIZE_MIB, half data and half holes (the corpus of
# bench/qcow2-write.sh), is converted to parallels by qemu-img, which is converted to raw and
# to qcow2 by Ferry and by qemu-img, RUNS times, interleaved in an order shuffled afresh each
# round; the page cache is written back and dropped before each run (when permitted). Prints
# the median time of each command, the size of what it wrote and its ratio to the qemu-img
# command it is compared with (both flush: ferry's default against qemu-img -t writeback).
# Every output is checked with qemu-img compare (and qcow2 with qemu-img check) on the first
# run. Ferry reads this format but does not write it, so there are no rows writing it.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 BENCH_DIR=/tmp bench/read-only.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5

bench_workdir ferry-bench-read-only
QSRC=$OUT/src.qcow2
PAR=$OUT/src.parallels

# kind | name | command (SRC the raw image, DST the target) | target format | the qemu-img row it is compared with
conversion_rows -- "parallels|-f parallels $PAR"
select_rows

guest_image
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
if [ "$KIND" != write ]; then
    qemu-img convert -f raw -O parallels "$SRC" "$PAR"
fi
sync

check_drop_caches

format_table "Parallels" "qcow2"
