#!/usr/bin/env bash
# NFS <-> iSCSI: Ferry against qemu-img convert, directly and with 1 ms added each way.
#
# The founding table of the iSCSI endpoint. Servers: nfs-ganesha (scripts/nfs-start.sh, NFSv3,
# 1 MiB rsize/wsize) and tgtd (scripts/iscsi-start.sh, file-backed LUNs), both inside one
# private network namespace with a portmapper on its port 111 (qemu-img 7.2's nfs:// takes no
# port options), with their files on a tmpfs (no disk noise; a flush costs nothing there).
# Lines, each at 0 ms and at +1 ms each way:
#   raw on NFS     -> iSCSI LUN (raw)     a SIZE_MIB image of random bytes
#   qcow2 on NFS   -> iSCSI LUN (raw)     the same size, half of its 64 KiB clusters allocated
#   iSCSI LUN      -> NFS (qcow2)         the backup
# The +1 ms lines go through ferry-delay-proxy in front of ganesha's NFS and MOUNT ports and
# tgtd's portal; qemu-img finds the proxied NFS ports through the portmapper, whose NFS and
# MOUNT entries are re-pointed at the proxy for those lines (and back for the 0 ms ones).
# Columns: Ferry's default (4 sessions, -m 8 in order, flushes the target at the end) against
# qemu-img convert -m 1 (the synchronous baseline), its default (-m 8) and -m 16 -W (qemu-img
# -n into the existing LUN; its default cache mode does not flush). Every command runs RUNS
# times, interleaved; medians, and Ferry's time over the best qemu-img's. A last line checks
# the proxy's own cost: Ferry through the proxy at 0 ms against Ferry direct.
#
#   FERRY=path/to/ferry PROXY=path/to/ferry-delay-proxy RUNS=3 SIZE_MIB=1024 bench/iscsi.sh
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$(cd "$HERE/.." && swift build -c release --show-bin-path 2>/dev/null || true)
FERRY=${FERRY:-$BIN/ferry}
PROXY=${PROXY:-$(dirname "$FERRY")/ferry-delay-proxy}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-1024}
DELAY_MS=${DELAY_MS:-1}
NETNS=${NETNS:-ferry-bench-iscsi}
program_files
[ -x "$FERRY" ] || { echo "bench: no ferry binary at $FERRY (make release)" >&2; exit 1; }
. "$HERE/lib/nfs-iscsi.sh"
rig_check

OUT=$(mktemp -d "${BENCH_DIR:-/dev/shm}/ferry-bench-iscsi.XXXXXX")
rig_dirs "$OUT"
cleanup() {
    rig_stop
    rm -rf "$OUT"
}
trap cleanup EXIT

echo "bench: building the images (${SIZE_MIB} MiB) in $OUT" >&2
RAW=$NFSSTATE/export/src.raw
QCOW=$NFSSTATE/export/src.qcow2
head -c "${SIZE_MIB}M" /dev/urandom >"$RAW"
# Half the clusters: every other MiB of random bytes, holes between, as qcow2.
HALF=$OUT/half.raw
truncate -s "${SIZE_MIB}M" "$HALF"
for (( k = 0; k < SIZE_MIB; k += 2 )); do
    dd if="$RAW" of="$HALF" bs=1M count=1 skip=$k seek=$k conv=notrunc status=none
done
qemu-img convert -f raw -O qcow2 "$HALF" "$QCOW"
rm -f "$HALF"
# The LUN backed up to NFS holds the random image from the start.
cp "$RAW" "$ISTATE/thick.img"

rig_start "$SIZE_MIB" "$DELAY_MS"

LUN=$RIG_LUN
BACK=$RIG_BACK

# line id | label | what
LINES=(
    "raw|raw on NFS -> iSCSI (raw)"
    "qcow2|qcow2 on NFS (half allocated) -> iSCSI (raw)"
    "backup|iSCSI -> NFS (qcow2)"
)
COLS=("ferry" "qemu -m 1" "qemu" "qemu -m 16 -W")
# SWEEP=1: Ferry at every fixed setting too (bench/defaults.sh's question for this path).
SWEEP_COLS=()
if [ "${SWEEP:-0}" = 1 ]; then
    for m in 1 4 8 16 32 64; do SWEEP_COLS+=("ferry -m $m --in-order" "ferry -m $m -W"); done
    COLS+=("${SWEEP_COLS[@]}")
fi

# The command of one cell: LINE COLUMN DELAY(0|1|p0)
command_for() {
    local line=$1 col=$2 d=$3 ip np mp
    read -r ip np mp <<<"$(rig_ports "$d")"
    local nfsF="nfs://127.0.0.1/export/FILE?nfsport=$np&mountport=$mp" nfsQ="nfs://127.0.0.1/export/FILE"
    local src dst fmt out=raw
    case $line in
        raw) fmt=raw; src=${nfsF/FILE/src.raw}; qsrc=${nfsQ/FILE/src.raw}; dst=iscsi://127.0.0.1:$ip/$LUN/1; qdst=$dst ;;
        qcow2) fmt=qcow2; src=${nfsF/FILE/src.qcow2}; qsrc=${nfsQ/FILE/src.qcow2}; dst=iscsi://127.0.0.1:$ip/$LUN/1; qdst=$dst ;;
        backup) fmt=raw; out=qcow2; src=iscsi://127.0.0.1:$ip/$BACK/1; qsrc=$src; dst=${nfsF/FILE/backup.qcow2}; qdst=${nfsQ/FILE/backup.qcow2} ;;
    esac
    local n=-n
    [ "$line" = backup ] && n=
    case $col in
        "ferry") echo "$FERRY convert -q -f $fmt -O $out '$src' '$dst'" ;;
        "ferry "*) echo "$FERRY convert -q ${col#ferry } -f $fmt -O $out '$src' '$dst'" ;;
        "qemu -m 1") echo "qemu-img convert $n -f $fmt -O $out -m 1 '$qsrc' '$qdst'" ;;
        "qemu") echo "qemu-img convert $n -f $fmt -O $out '$qsrc' '$qdst'" ;;
        "qemu -m 16 -W") echo "qemu-img convert $n -f $fmt -O $out -m 16 -W '$qsrc' '$qdst'" ;;
    esac
}

check() {   # LINE
    case $1 in
        raw) qemu-img compare -q -f raw -F raw "$RAW" "$ISTATE/thin.img" ;;
        qcow2) qemu-img compare -q -f qcow2 -F raw "$QCOW" "$ISTATE/thin.img" ;;
        backup) qemu-img compare -q -f raw -F qcow2 "$ISTATE/thick.img" "$NFSSTATE/export/backup.qcow2" &&
                qemu-img check -q "$NFSSTATE/export/backup.qcow2" ;;
    esac
}

BENCH_IN=("${IN[@]}")
# Files on tmpfs: dirty pages written back before each run, nothing to drop.
BENCH_SETTLE=sync
measure() {   # LINE COLUMN DELAY
    local line=$1 col=$2 d=$3
    # Emptied, not removed: ganesha keeps the files it served open, and removed ones would
    # pile up in memory on the tmpfs.
    [ -e "$NFSSTATE/export/backup.qcow2" ] && : >"$NFSSTATE/export/backup.qcow2"
    timed "$line|$d|$col" "$(command_for "$line" "$col" "$d")"
    if (( run == 1 )); then
        check "$line" || { echo "bench: $col ($line, $d) produced a different image" >&2; exit 1; }
    fi
}
for (( run = 1; run <= RUNS; run++ )); do
    for d in 0 1; do
        rig_pmap "$d"
        for l in "${LINES[@]}"; do
            line=${l%%|*}
            mapfile -t ORDER < <(shuffle "$run" "${COLS[@]}")
            for col in "${ORDER[@]}"; do measure "$line" "$col" "$d"; done
            # The proxy's own cost: Ferry through it at 0 ms, right after the direct runs.
            if [ "$d" = 0 ] && [ "$line" = raw ]; then measure raw ferry p0; fi
        done
    done
    echo "bench: run $run of $RUNS done" >&2
done

secs() { awk -v m="$1" 'BEGIN { printf "%.2f", m / 1e6 }'; }

echo
echo "NFS (ganesha, NFSv3) <-> iSCSI (tgtd) on loopback, ${SIZE_MIB} MiB, median seconds of $RUNS runs, $(uname -r), $(nproc) CPUs"
echo
printf '| %-46s | %-6s | %7s | %9s | %7s | %13s | %-12s |\n' "copy" "added" "ferry" "qemu -m 1" "qemu" "qemu -m 16 -W" "ferry / best"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "------------------------------------------------" "--------" "---------" "-----------" "---------" "---------------" "--------------"
for d in 0 1; do
    for l in "${LINES[@]}"; do
        line=${l%%|*}; label=${l#*|}
        f=$(median_us "${TIMES["$line|$d|ferry"]}")
        q1=$(median_us "${TIMES["$line|$d|qemu -m 1"]}")
        q8=$(median_us "${TIMES["$line|$d|qemu"]}")
        q16=$(median_us "${TIMES["$line|$d|qemu -m 16 -W"]}")
        best=$(printf '%s\n' "$q1" "$q8" "$q16" | sort -n | head -1)
        ratio=$(awk -v f="$f" -v b="$best" 'BEGIN { printf "%.2f", f / b }')
        printf '| %-46s | %-6s | %7s | %9s | %7s | %13s | %-12s |\n' "$label" "+${d} ms" "$(secs "$f")" "$(secs "$q1")" "$(secs "$q8")" "$(secs "$q16")" "$ratio"
    done
done
f=$(median_us "${TIMES["raw|0|ferry"]}")
p=$(median_us "${TIMES["raw|p0|ferry"]}")
echo
echo "Proxy cost: ferry raw on NFS -> iSCSI through ferry-delay-proxy at 0 ms: $(secs "$p") s against $(secs "$f") s direct ($(awk -v p="$p" -v f="$f" 'BEGIN { printf "%+.1f%%", (p / f - 1) * 100 }'))."
echo "ratio < 1: Ferry faster than the fastest qemu-img row. +N ms: added each way by ferry-delay-proxy on both the NFS and the iSCSI links."
if [ "${#SWEEP_COLS[@]}" -gt 0 ]; then
    echo
    echo "Ferry's default against its best fixed setting (-m 1..64, --in-order or -W), same runs:"
    echo
    printf '| %-46s | %-6s | %-22s | %14s |\n' "copy" "added" "best fixed setting" "default / best"
    printf '|%s|%s|%s|%s|\n' "------------------------------------------------" "--------" "------------------------" "----------------"
    for d in 0 1; do
        for l in "${LINES[@]}"; do
            line=${l%%|*}; label=${l#*|}
            f=$(median_us "${TIMES["$line|$d|ferry"]}")
            best= bestname=
            for c in "${SWEEP_COLS[@]}"; do
                m=$(median_us "${TIMES["$line|$d|$c"]}")
                if [ -z "$best" ] || (( m < best )); then best=$m; bestname=$c; fi
            done
            printf '| %-46s | %-6s | %-22s | %14s |\n' "$label" "+${d} ms" "$bestname" "$(awk -v f="$f" -v b="$best" 'BEGIN { printf "%.2f", f / b }')"
        done
    done
fi
