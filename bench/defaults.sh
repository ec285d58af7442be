#!/usr/bin/env bash
# Is Ferry's default the best setting? On every path: Ferry's default against each fixed
# setting of -m 1, 4, 8, 16, 32, 64, in order (--in-order) and not (-W), qemu-img's default
# and -m 16 -W, and nbdcopy, in one run, interleaved, medians. Every command flushes the
# target (Ferry by default, qemu-img -t writeback, nbdcopy --flush). The default runs as two
# rows ("again / default": the noise floor), since the best of twelve noisy fixed rows beats
# any one command's median by chance. Then a second round times again, afresh, only the
# default, the best fixed setting, qemu-img's better row and nbdcopy of each path (CONFIRM_RUNS
# runs, default RUNS; 0 skips it): a row picked as the fastest of twelve is lucky by its
# selection, so the summary's ratios come from this round, where it is measured anew.
# Before each run the page cache is dropped and the programs read back in (settle): the image
# comes from disk, the tools from memory (BENCH_PROGRAMS=cold: from disk too). Rows are only
# compared within a path, so the paths run in phases by the servers they need (local and NBD,
# then Ceph, then NFS/iSCSI), each phase's servers up only during its two rounds.
#
# Paths (PATHS picks some):
#   local-raw      raw -> raw, local files (page cache dropped before each run)
#   local-qcow2    raw -> qcow2, local files
#   nbd            nbdkit file export -> local raw, no delay
#   nbd-2ms        the same export with 2 ms per read command
#   nbd-nbd        the 2 ms export -> nbdkit memory (qemu-img and ferry with -n)
#   rbd-in         raw -> a new RBD image in a one-node Ceph cluster (scripts/ceph-start.sh)
#   rbd-out        that cluster's raw image -> local raw
#   nfs-iscsi      raw on NFS (nfs-ganesha) -> an iSCSI LUN (tgtd), both in a private network
#                  namespace with their files on tmpfs (bench/lib/nfs-iscsi.sh; qemu-img -n)
#   nfs-iscsi-1ms  the same with 1 ms added each way on both links (ferry-delay-proxy)
#   overwrite      raw -> raw over an existing target, unflushed (-t unsafe), against qemu-img
#                  and against ferry into a new file (the 0.6-0.7 s against 0.33 s defect)
# The machine's own limit, for the paths that read and write this disk: fio reading as many
# bytes as the image holds data while writing as many to a new file and fsyncing it (local
# and NBD -> local paths), or only reading them (NBD -> NBD memory); O_DIRECT, 2 MiB at depth
# 16 each, so the disk does nothing else. Its time is the one fio counts, its own start left
# out (a cold fio takes 0.35-0.4 s to start: it loads librbd and more). "default / limit" is
# the default's time, start included, over that. Then the peak RSS of `ferry -m 1024` (the
# cap on bytes in flight holds it).
#
#   FERRY=path/to/ferry RUNS=3 SIZE_MIB=512 PATHS="local-raw nbd-2ms" bench/defaults.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
bench_defaults 3
PATHS=${PATHS:-local-raw local-qcow2 nbd nbd-2ms nbd-nbd rbd-in rbd-out nfs-iscsi nfs-iscsi-1ms overwrite}
bench_workdir ferry-bench-defaults
export FERRY_NBD_DIR=$OUT/nbd
RIG=
cleanup() {
    "$HERE/../scripts/nbd-stop.sh" src src2 dst >/dev/null 2>&1 || true
    "$HERE/../scripts/ceph-stop.sh" "$OUT/ceph" >/dev/null 2>&1 || true
    if [ -n "$RIG" ]; then rig_stop; rm -rf "$RIG"; fi
    rm -rf "$OUT"
}
trap cleanup EXIT
check_drop_caches

guest_image
T=$OUT/dst.img
URL0= URL2= MEM=
if [[ " $PATHS " == *" nbd"* ]]; then
    URL0=$("$HERE/../scripts/nbd-start.sh" src unix file "$SRC")
    URL2=$("$HERE/../scripts/nbd-start.sh" src2 unix --filter=delay file "$SRC" delay-read=2ms)
    MEM=$("$HERE/../scripts/nbd-start.sh" dst unix memory "${SIZE_MIB}M")
fi

# The RBD and NFS/iSCSI servers run only while their own paths are timed (see phase): an idle
# Ceph cluster beside the NBD rows gave Ferry's runs a slow tail (0.71-0.81 s where the others
# took 0.50-0.64) and moved the paired ratio of two identical commands to 1.13.
CONF=$OUT/ceph/ceph.conf
RBD_IN="rbd:rbdpool/dst:conf=$CONF"
RBD_OUT="rbd:rbdpool/src:conf=$CONF"
ceph_up() {
    CEPH_MON_PORT=19500 "$HERE/../scripts/ceph-start.sh" "$OUT/ceph" >/dev/null
    rbd -c "$CONF" import --no-progress "$SRC" rbdpool/src >/dev/null
}
ceph_down() { "$HERE/../scripts/ceph-stop.sh" "$OUT/ceph" >/dev/null 2>&1 || true; }

NFS_URL= QNFS_URL= ISCSI_URL= NFS_URL1= ISCSI_URL1=
if [[ " $PATHS " == *" nfs-iscsi"* ]]; then
    PROXY=${PROXY:-$(dirname "$FERRY")/ferry-delay-proxy}
    NETNS=${NETNS:-ferry-bench-defaults}
    . "$HERE/lib/nfs-iscsi.sh"
    rig_check
    RIG=$(mktemp -d /dev/shm/ferry-bench-defaults.XXXXXX)
    rig_dirs "$RIG"
    cp --sparse=always "$SRC" "$NFSSTATE/export/src.raw"
    read -r ip np mp <<<"$(rig_ports 0)"
    NFS_URL="nfs://127.0.0.1/export/src.raw?nfsport=$np&mountport=$mp" ISCSI_URL="iscsi://127.0.0.1:$ip/$RIG_LUN/1"
    read -r ip np mp <<<"$(rig_ports 1)"
    NFS_URL1="nfs://127.0.0.1/export/src.raw?nfsport=$np&mountport=$mp" ISCSI_URL1="iscsi://127.0.0.1:$ip/$RIG_LUN/1"
    # qemu-img finds the NFS ports through the portmapper (rig_pmap before each of its rows).
    QNFS_URL="nfs://127.0.0.1/export/src.raw"
fi
rig_up() { rig_start "$SIZE_MIB" 1; }
rig_down() { rig_stop; }
base_up() { :; }
base_down() { :; }
# The servers a path's rows need beyond nbdkit's (idle when not read): ceph, rig or base.
group_of() { case $1 in rbd-*) echo ceph ;; nfs-iscsi*) echo rig ;; *) echo base ;; esac; }

# path|name|command (T: the local target)|target to check|its format
ROWS=()
sweep() {   # PATH SOURCE TARGET CHECK FORMAT FERRY_ARGS QEMU_ARGS NBDCOPY(file, nbd or none) [QEMU_SOURCE]
    local p=$1 s=$2 t=$3 c=$4 f=$5 fa=$6 qa=$7 m w qs=${9:-$2}
    # The default twice, as two rows: how far apart one command's medians land is the noise
    # floor that "default / best" (the luckiest of twelve fixed rows) is to be read against.
    ROWS+=("$p|ferry|$FERRY convert -q -f raw $fa '$s' '$t'|$c|$f"
           "$p|ferry (again)|$FERRY convert -q -f raw $fa '$s' '$t'|$c|$f")
    for m in 1 4 8 16 32 64; do
        ROWS+=("$p|ferry -m $m --in-order|$FERRY convert -q -f raw $fa -m $m --in-order '$s' '$t'|$c|$f"
               "$p|ferry -m $m -W|$FERRY convert -q -f raw $fa -m $m -W '$s' '$t'|$c|$f")
    done
    ROWS+=("$p|qemu-img|qemu-img convert -t writeback -f raw $qa '$qs' '$t'|$c|$f"
           "$p|qemu-img -m 16 -W|qemu-img convert -t writeback -f raw $qa -m 16 -W '$qs' '$t'|$c|$f")
    # nbdcopy writes into an existing file or export of the right size.
    case $8 in
        file) ROWS+=("$p|nbdcopy|truncate -s ${SIZE_MIB}M '$t' && nbdcopy --flush '$s' '$t'|$c|$f") ;;
        nbd) ROWS+=("$p|nbdcopy|nbdcopy --flush '$s' '$t'|$c|$f") ;;
    esac
    return 0
}
for p in $PATHS; do
    case $p in
        local-raw)   sweep "$p" "$SRC" "$T" "$T" raw "-O raw" "-O raw" file ;;
        local-qcow2) sweep "$p" "$SRC" "$T" "$T" qcow2 "-O qcow2" "-O qcow2" none ;;
        nbd)         sweep "$p" "$URL0" "$T" "$T" raw "-O raw" "-O raw" file ;;
        nbd-2ms)     sweep "$p" "$URL2" "$T" "$T" raw "-O raw" "-O raw" file ;;
        nbd-nbd)     sweep "$p" "$URL2" "$MEM" "$MEM" raw "-O raw -n" "-O raw -n" nbd ;;
        rbd-in)      sweep "$p" "$SRC" "$RBD_IN" "$RBD_IN" raw "-O raw" "-O raw" none ;;
        rbd-out)     sweep "$p" "$RBD_OUT" "$T" "$T" raw "-O raw" "-O raw" none ;;
        nfs-iscsi)   sweep "$p" "$NFS_URL" "$ISCSI_URL" "$ISTATE/thin.img" raw "-O raw" "-O raw -n" none "$QNFS_URL" ;;
        nfs-iscsi-1ms) sweep "$p" "$NFS_URL1" "$ISCSI_URL1" "$ISTATE/thin.img" raw "-O raw" "-O raw -n" none "$QNFS_URL" ;;
        overwrite)
            ROWS+=("$p|ferry -t unsafe, over a file|$FERRY convert -q -t unsafe -f raw '$SRC' '$T'|$T|raw"
                   "$p|ferry -t unsafe, new file|$FERRY convert -q -t unsafe -f raw '$SRC' '$T'|$T|raw"
                   "$p|qemu-img, over a file|qemu-img convert -f raw -O raw '$SRC' '$T'|$T|raw") ;;
        *) echo "bench: unknown path $p" >&2; exit 1 ;;
    esac
done
# The machine's limits (see the top), once each, shared by the paths that name them. The
# file read holds as many bytes as the image's data (contents do not matter to the disk).
declare -A LIMIT=([local-raw]=disk [local-qcow2]=disk [nbd]=disk [nbd-2ms]=disk [nbd-nbd]=memory)
declare -A LIMIT_NAME=([disk]="fio read + write, fsync" [memory]="fio read")
declare -A NEEDED=()
for p in $PATHS; do [ -z "${LIMIT[$p]:-}" ] || NEEDED[${LIMIT[$p]}]=1; done
if (( ${#NEEDED[@]} )); then
    command -v fio >/dev/null || { echo "bench: fio is missing (scripts/install-deps.sh)" >&2; exit 1; }
    limit_data 1
    FIO_READ="--name=read --ioengine=io_uring --iodepth=16 --direct=1 --rw=read --bs=2M --size=${data_mib}M --filename=$OUT/data.raw"
    # Direct: buffered writes flushed at the end (psync) took 0.96 s where Ferry took 0.51,
    # since nothing reached the disk before the fsync.
    FIO_WRITE="--name=write --ioengine=io_uring --iodepth=16 --direct=1 --rw=write --bs=2M --size=${data_mib}M --end_fsync=1 --filename=$T"
fi
[ -z "${NEEDED[disk]:-}" ] || ROWS+=("limit|${LIMIT_NAME[disk]}|$FIO_READ $FIO_WRITE")
[ -z "${NEEDED[memory]:-}" ] || ROWS+=("limit|${LIMIT_NAME[memory]}|$FIO_READ")

row() {   # RUN ROW
    local run=$1 p name cmd check fmt
    IFS='|' read -r p name cmd check fmt <<<"$2"
    rm -f "$T"
    if [ "$p" = limit ]; then fio_limit "$p/$name" "$cmd"; return; fi
    # A new RBD image each run (removing it is not timed).
    [ "$p" != rbd-in ] || rbd -c "$CONF" rm --no-progress rbdpool/dst >/dev/null 2>&1 || true
    # The overwrite rows' target exists first, written back, and is not part of the time.
    # (Timing the setup apart and taking its median off left qemu-img's row at 0 once.)
    if [[ $name == *"over a file"* ]]; then
        cp --sparse=always "$SRC" "$T" && sync
    fi
    local -a BENCH_IN=()
    if [[ $p == nfs-iscsi* ]]; then
        # The servers live in a namespace; qemu-img finds the right NFS ports by portmapper.
        BENCH_IN=("${IN[@]}")
        [[ $name != qemu-img* ]] || rig_pmap "$([ "$p" = nfs-iscsi ] && echo 0 || echo 1)"
    fi
    timed "$ROUND$p/$name" "$cmd"
    if [ -z "$ROUND" ] && (( run == 1 )); then
        qemu-img compare -q -f raw -F "$fmt" "$SRC" "$check" || { echo "bench: $p: $name produced a different image" >&2; exit 1; }
    fi
}
declare -A BEST BEST_NAME QBEST QBEST_NAME NBDC DEFAULT AGAIN
median_us_of() { median_us "${TIMES[$1]}"; }
# pick: from the first round's medians of ROWS, each path's best fixed setting, qemu-img's
# better row, nbdcopy's, and the two default rows.
pick() {
    local row p name us
    for row in "${ROWS[@]}"; do
        IFS='|' read -r p name _ <<<"$row"
        us=$(median_us_of "$p/$name")
        case $name in
            "ferry -m "*) if [ -z "${BEST[$p]:-}" ] || (( us < BEST[$p] )); then BEST[$p]=$us; BEST_NAME[$p]=$name; fi ;;
            qemu-img*) if [ -z "${QBEST[$p]:-}" ] || (( us < QBEST[$p] )); then QBEST[$p]=$us; QBEST_NAME[$p]=$name; fi ;;
            nbdcopy) NBDC[$p]=$us ;;
            ferry) DEFAULT[$p]=$us ;;
            "ferry (again)") AGAIN[$p]=$us ;;
        esac
    done
}
# The second round: the rows the summary compares, measured again (see the top).
CONFIRM_RUNS=${CONFIRM_RUNS:-$RUNS}
confirm() {
    local sweep=("${ROWS[@]}") row p name
    local -A paths=()
    ROWS=()
    for row in "${sweep[@]}"; do
        IFS='|' read -r p name _ <<<"$row"
        [ -n "${DEFAULT[$p]:-}" ] || continue
        paths[$p]=1
        case $name in
            ferry|nbdcopy|"${BEST_NAME[$p]}"|"${QBEST_NAME[$p]}") ROWS+=("$row") ;;
        esac
    done
    (( ${#ROWS[@]} )) || return 0
    ROUND=again: RUNS=$CONFIRM_RUNS run_rounds row
    for p in "${!paths[@]}"; do
        DEFAULT[$p]=$(median_us_of "again:$p/ferry")
        BEST[$p]=$(median_us_of "again:$p/${BEST_NAME[$p]}")
        QBEST[$p]=$(median_us_of "again:$p/${QBEST_NAME[$p]}")
        [ -z "${NBDC[$p]:-}" ] || NBDC[$p]=$(median_us_of "again:$p/nbdcopy")
    done
}
# phase GROUP: the group's servers up, both rounds over its rows (rows are only ever compared
# within a path, so a path's rows need interleaving only with each other), its servers down.
ALL_ROWS=("${ROWS[@]}")
phase() {
    local g=$1 row p
    ROWS=()
    for row in "${ALL_ROWS[@]}"; do
        IFS='|' read -r p _ <<<"$row"
        [ "$(group_of "$p")" != "$g" ] || ROWS+=("$row")
    done
    (( ${#ROWS[@]} )) || return 0
    echo "bench: the $g paths" >&2
    "${g}_up"
    ROUND=
    run_rounds row
    pick
    (( CONFIRM_RUNS == 0 )) || confirm
    "${g}_down"
}
for g in base ceph rig; do phase "$g"; done
ROWS=("${ALL_ROWS[@]}")

echo
echo "Ferry's default against every fixed setting, ${SIZE_MIB} MiB image (half data: binaries and text), median of $RUNS runs, $(uname -r), $(nproc) CPUs; every command flushes; programs ${BENCH_PROGRAMS:-warm}, images cold"
echo
printf '| %-13s | %-30s | %8s | %7s | %10s |\n' path command "median s" "MiB/s" "ratio"
printf '|%s|%s|%s|%s|%s|\n' --------------- -------------------------------- ---------- --------- ------------
r() { awk -v a="$1" -v b="${2:-}" 'BEGIN { if (b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }
# pr PATH NAME: " (P)", the default's paired ratio against NAME in the second round; nothing
# without that round or that row.
pr() { [ -z "${TIMES["again:$1/$2"]:-}" ] || echo " ($(paired_ratio "again:$1/ferry" "again:$1/$2"))"; }
for row in "${ROWS[@]}"; do
    IFS='|' read -r p name _ <<<"$row"
    us=$(median_us_of "$p/$name")
    # Against Ferry's default; the overwrite rows against qemu-img over a file; limits alone.
    ref="$p/ferry"
    [ -n "${TIMES[$ref]:-}" ] || ref="$p/qemu-img, over a file"
    refus=
    [ -z "${TIMES[$ref]:-}" ] || refus=$(median_us_of "$ref")
    read -r secs rate ratio <<<"$(row_figures "$us" "$refus")"
    printf '| %-13s | %-30s | %8s | %7s | %10s |\n' "$p" "$name" "$secs" "$rate" "${ratio:-}"
done
echo
echo "ratio: the command's median over Ferry's default's on the same path (> 1: the default is faster); overwrite rows over qemu-img's over a file."

echo
if (( CONFIRM_RUNS > 0 )); then
    echo "Summary: default, best fixed setting, qemu-img's better row and nbdcopy timed again, median of $CONFIRM_RUNS fresh runs (again / default: the first round's two default rows)"
else
    echo "Summary: from the table above (again / default: its two default rows)"
fi
echo
printf '| %-13s | %-22s | %14s | %15s | %18s | %17s | %15s |\n' path "best fixed setting" "default / best" "again / default" "default / qemu-img" "default / nbdcopy" "default / limit"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' --------------- ------------------------ ---------------- ----------------- -------------------- ------------------- -----------------
for p in $PATHS; do
    [ -n "${DEFAULT[$p]:-}" ] || continue
    lim=
    if [ -n "${LIMIT[$p]:-}" ]; then lim=$(median_us_of "limit/${LIMIT_NAME[${LIMIT[$p]}]}"); fi
    printf '| %-13s | %-22s | %14s | %15s | %18s | %17s | %15s |\n' "$p" "${BEST_NAME[$p]}" "$(r "${DEFAULT[$p]}" "${BEST[$p]}")$(pr "$p" "${BEST_NAME[$p]}")" \
        "$(r "${AGAIN[$p]:-}" "${DEFAULT[$p]}")" "$(r "${DEFAULT[$p]}" "${QBEST[$p]}")$(pr "$p" "${QBEST_NAME[$p]}")" \
        "$(r "${DEFAULT[$p]}" "${NBDC[$p]:-}")$(pr "$p" nbdcopy)" "$(r "${DEFAULT[$p]}" "$lim")"
done
echo
if (( CONFIRM_RUNS > 0 )); then
    echo "In brackets: the paired ratio, the median of the two commands' ratios run by run in the second round (paired_ratio in bench/lib/common.sh), which the machine's drift between runs does not move."
fi
echo "default / limit: the default's time (its start included) over fio's, moving as many bytes as the image's data on this disk with O_DIRECT (reading and writing, then fsync; reading only for nbd-nbd, whose target is memory). The RBD and NFS/iSCSI paths' limits are their servers', not measured."

# Memory: -m 1024 asks for 2 GiB of buffers; the cap on bytes in flight (128 MiB) holds it.
rm -f "$T"
rss=$( { /usr/bin/time -f '%M' "$FERRY" convert -q -m 1024 -f raw "$SRC" "$T" >/dev/null; } 2>&1 | tail -1)
rm -f "$T"
rss_default=$( { /usr/bin/time -f '%M' "$FERRY" convert -q -f raw "$SRC" "$T" >/dev/null; } 2>&1 | tail -1)
echo "Peak RSS: ferry -m 1024 $(( rss / 1024 )) MiB, ferry's default $(( rss_default / 1024 )) MiB (--max-in-flight 128M caps the buffers)."
