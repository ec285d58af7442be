#!/usr/bin/env bash
# VHD (vpc) and VHDX on the local filesystem: Ferry against qemu-img convert.
#
# A raw guest image of SIZE_MIB, half data and half holes (the corpus of
# bench/qcow2-write.sh), and a qcow2 copy of it, are converted to fixed VHD, dynamic VHD and
# VHDX; and those three, made from it by qemu-img, are converted back to raw and to qcow2.
# Each by Ferry and by qemu-img, RUNS times, interleaved in an order shuffled afresh each
# round; the page cache is written back and dropped before each run (when permitted). Prints
# the median time of each command, the size of what it wrote and its ratio to the qemu-img
# command it is compared with (both flush: ferry's default against qemu-img -t writeback).
# Every output is checked with qemu-img compare (and qcow2 and vhdx with qemu-img check;
# qemu-img cannot check vpc) on the first run.
#
# KIND=write (or read) keeps only the rows that write (read) VHD and VHDX.
#
#   FERRY=path/to/ferry RUNS=5 SIZE_MIB=1024 KIND=write BENCH_DIR=/tmp bench/vhd.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

bench_defaults 5

bench_workdir ferry-bench-vhd
QSRC=$OUT/src.qcow2
FIXED=$OUT/src-fixed.vhd
DYN=$OUT/src-dynamic.vhd
VX=$OUT/src.vhdx

# kind | name | command (SRC the raw image, DST the target) | target format | the qemu-img row it is compared with
conversion_rows "fixed vhd|-O vpc -o subformat=fixed|vpc" "dynamic vhd|-O vpc|vpc" "vhdx|-O vhdx|vhdx" -- "fixed vhd|-f vpc $FIXED" "dynamic vhd|-f vpc $DYN" "vhdx|-f vhdx $VX"
select_rows

guest_image
qemu-img convert -f raw -O qcow2 "$SRC" "$QSRC"
if [ "$KIND" != write ]; then
    qemu-img convert -f raw -O vpc -o subformat=fixed "$SRC" "$FIXED"
    qemu-img convert -f raw -O vpc "$SRC" "$DYN"
    qemu-img convert -f raw -O vhdx "$SRC" "$VX"
fi
sync

check_drop_caches

format_table "VHD and VHDX" "qcow2 vhdx"
