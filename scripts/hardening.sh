#!/usr/bin/env bash
# The hardening figures in one table (`make hardening`): hostile inputs refused cleanly, and
# copies through servers that fail requests or drop the link. "Anything else" must be zero
# everywhere: a crash, a hang, a wrong image or a failure that leaves a target behind.
#
#   FERRY=path/to/ferry RUNS=3 scripts/hardening.sh
#
# 1. Every input in Fuzz/corpus (real images and libFuzzer's mutations of them) is opened with
#    `ferry info` and copied with `ferry convert`: each must succeed or fail with one
#    `ferry:` line and exit 1, never a signal or a timeout.
# 2. nbdkit's error filter fails reads (a source export) or writes (a target export) at
#    0.1% to 10%; each copy must end with exact data (qemu-img compare) or fail with one line
#    naming the offset, leaving no new target. Then copies from NBD and NFS and into iSCSI
#    with the link cut once and restored (ferry-delay-proxy killed and started again), and
#    into Ceph RBD with the OSD killed once and started again.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
FERRY=${FERRY:-$(cd "$ROOT" && swift build --show-bin-path)/ferry}
PROXY=${PROXY:-$(dirname "$FERRY")/ferry-delay-proxy}
RUNS=${RUNS:-3}
[ -x "$FERRY" ] || { echo "hardening: no ferry binary at $FERRY (swift build)" >&2; exit 1; }
[ -x "$PROXY" ] || { echo "hardening: no ferry-delay-proxy at $PROXY (swift build)" >&2; exit 1; }
OUT=$(mktemp -d /tmp/ferry-hardening.XXXXXX)
export FERRY_NBD_DIR=$OUT/nbd
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    "$HERE/nbd-stop.sh" src dst far >/dev/null 2>&1 || true
    "$HERE/nfs-stop.sh" "$OUT/nfs" >/dev/null 2>&1 || true
    "$HERE/iscsi-stop.sh" "$OUT/iscsi" >/dev/null 2>&1 || true
    "$HERE/ceph-stop.sh" "$OUT/ceph" >/dev/null 2>&1 || true
    rm -rf "$OUT"
}
trap cleanup EXIT
OTHER_TOTAL=0

# --- 1. hostile inputs -------------------------------------------------------------------
ok=0 refused=0 other=0
while IFS= read -r f; do
    fmt=$(basename "$(dirname "$f")")
    for cmd in "info -f $fmt" "convert -q -f $fmt -O raw"; do
        args=($cmd "$f")
        [[ $cmd == convert* ]] && args+=("$OUT/out.raw")
        rc=0
        err=$(timeout 20 "$FERRY" "${args[@]}" 2>&1 >/dev/null | tr -d '\000') || rc=$?
        rm -f "$OUT/out.raw"
        if (( rc == 0 )); then ok=$((ok + 1))
        elif (( rc == 1 )) && [ "$(grep -c '^ferry: ' <<<"$err")" -ge 1 ]; then refused=$((refused + 1))
        else other=$((other + 1)); echo "hardening: $cmd $f: exit $rc: $err" >&2
        fi
    done
done < <(find "$ROOT/Fuzz/corpus" -type f | sort)
OTHER_TOTAL=$((OTHER_TOTAL + other))
echo
echo "Hostile inputs: every file of Fuzz/corpus through ferry info and ferry convert"
echo
echo "| runs | read cleanly | refused with one line | anything else |"
echo "|---|---|---|---|"
echo "| $((ok + refused + other)) | $ok | $refused | $other |"

# --- 2. failing servers ------------------------------------------------------------------
SRC=$OUT/src.raw
truncate -s 64M "$SRC"
for (( k = 0; k < 16; k++ )); do
    dd if=/dev/urandom of="$SRC" bs=2M count=1 seek=$(( k * 2 )) conv=notrunc status=none
done
MEM=$OUT/mem.raw

# one_copy KIND RATE: prints "exact", "clean" or "other"
one_copy() {
    local kind=$1 rate=$2 url dst rc err
    if [ "$kind" = read ]; then
        url=$("$HERE/nbd-start.sh" src unix --filter=error file "$SRC" error-pread-rate="$rate" error-pread=EIO)
        dst=$OUT/dst.raw
        rc=0; err=$(timeout 120 "$FERRY" convert -q --buffer-size 256k -f raw -O raw "$url" "$dst" 2>&1) || rc=$?
        "$HERE/nbd-stop.sh" src >/dev/null
        classify "$rc" "$err" "$dst" yes
    else
        truncate -s 0 "$MEM"; truncate -s 64M "$MEM"
        url=$("$HERE/nbd-start.sh" dst unix --filter=error file "$MEM" error-pwrite-rate="$rate" error-pwrite=EIO)
        rc=0; err=$(timeout 120 "$FERRY" convert -q -n --buffer-size 256k -f raw -O raw "$SRC" "$url" 2>&1) || rc=$?
        "$HERE/nbd-stop.sh" dst >/dev/null
        classify "$rc" "$err" "$MEM" no
    fi
}

# classify STATUS STDERR RESULT NEW_TARGET
classify() {
    local rc=$1 err=$2 result=$3 new=$4
    if (( rc == 0 )) && qemu-img compare -q -f raw -F raw "$SRC" "$result" 2>/dev/null; then echo exact
    elif (( rc == 1 )) && [ "$(grep -c '^ferry: ' <<<"$err")" = 1 ] && grep -q offset <<<"$err" \
         && { [ "$new" = no ] || [ ! -e "$result" ]; }; then echo clean; echo "hardening: failed cleanly: $err" >&2
    else echo other; echo "hardening: exit $rc: $err" >&2
    fi
    rm -f "$OUT/dst.raw"
}

echo
echo "Failing servers: nbdkit's error filter (EIO), $RUNS copies of a 64 MiB image (32 MiB of data) each, default --retries"
echo
echo "| faults | injected into | runs | completed exact | failed cleanly | anything else |"
echo "|---|---|---|---|---|---|"
for rate in 0.1% 1% 5% 10% 30%; do
    for kind in read write; do
        exact=0 clean=0 other=0
        for (( r = 0; r < RUNS; r++ )); do
            case $(one_copy $kind $rate) in
                exact) exact=$((exact + 1)) ;;
                clean) clean=$((clean + 1)) ;;
                *) other=$((other + 1)) ;;
            esac
        done
        OTHER_TOTAL=$((OTHER_TOTAL + other))
        echo "| $rate | ${kind}s | $RUNS | $exact | $clean | $other |"
    done
done

# cut_link LABEL DATA_PORT RESULT NEW_TARGET CONVERT_ARGS...: RUNS copies through a proxy on
# port LPORT in front of DATA_PORT, the link cut 0.5 s in and restored 0.3 s later; one row.
cut_link() {
    local label=$1 port=$2 result=$3 new=$4 rc C P exact=0 clean=0 other=0 r
    shift 4
    for (( r = 0; r < RUNS; r++ )); do
        # An existing target starts from zeros, so that the last run's data cannot pass for this one's.
        [ "$new" = yes ] || { truncate -s 0 "$result"; truncate -s 64M "$result"; }
        "$PROXY" $LPORT 127.0.0.1:$port 0 >/dev/null 2>&1 & P=$!; PIDS+=("$P"); sleep 0.3
        rc=0
        ( "$FERRY" convert -q "$@" 2>"$OUT/err" ) & C=$!
        sleep 0.5; kill "$P"; wait "$P" 2>/dev/null || true; sleep 0.3
        "$PROXY" $LPORT 127.0.0.1:$port 0 >/dev/null 2>&1 & P=$!; PIDS+=("$P")
        wait "$C" || rc=$?
        case $(classify "$rc" "$(cat "$OUT/err")" "$result" "$new") in
            exact) exact=$((exact + 1)) ;;
            clean) clean=$((clean + 1)) ;;
            *) other=$((other + 1)) ;;
        esac
        kill "$P"; wait "$P" 2>/dev/null || true
    done
    OTHER_TOTAL=$((OTHER_TOTAL + other))
    echo "| link cut once, restored after 0.3 s | $label | $RUNS | $exact | $clean | $other |"
}

# Each server behind the proxy: NBD (2 ms reads) and NFS as sources, an iSCSI LUN as target
# (-r keeps the copy going past the cut).
# Below the ephemeral range (32768-60999), where a connection could hold the port.
PORT=$(( 20000 + RANDOM % 10000 ))
LPORT=$(( PORT + 1 ))
# One thread per connection: nbdkit 1.32 aborts (raw_send_socket: Assertion `sock >= 0')
# when a connection is reset while several of its threads send replies.
"$HERE/nbd-start.sh" far tcp:$PORT --threads 1 --filter=delay file "$SRC" rdelay=2ms >/dev/null
cut_link "an NBD source" $PORT "$OUT/dst.raw" yes -m 4 --buffer-size 512k -f raw -O raw "nbd://127.0.0.1:$LPORT" "$OUT/dst.raw"

NFS_PORT=$(( PORT + 2 )) MOUNT_PORT=$(( PORT + 3 )) "$HERE/nfs-start.sh" "$OUT/nfs" >/dev/null
cp "$SRC" "$OUT/nfs/export/src.raw"
cut_link "an NFS source" $(( PORT + 2 )) "$OUT/dst.raw" yes -r 32M -f raw -O raw \
    "nfs://127.0.0.1/export/src.raw?nfsport=$LPORT&mountport=$(( PORT + 3 ))" "$OUT/dst.raw"
"$HERE/nfs-stop.sh" "$OUT/nfs" >/dev/null 2>&1 || true

ISCSI_PORT=$(( PORT + 4 )) ISCSI_CTL=$(( 100 + RANDOM % 100 )) ISCSI_SIZE=64M "$HERE/iscsi-start.sh" "$OUT/iscsi" >/dev/null
cut_link "an iSCSI target" $(( PORT + 4 )) "$OUT/iscsi/thin.img" no -n -r 32M -f raw -O raw "$SRC" \
    "iscsi://127.0.0.1:$LPORT/iqn.2026-01.dev.ferry:thin/1"
"$HERE/iscsi-stop.sh" "$OUT/iscsi" >/dev/null 2>&1 || true

# Ceph: the OSD under a copy into a new RBD image is killed (SIGKILL) 0.5 s in and started
# again 0.3 s later; librados must carry the copy through, or it fails cleanly and the image
# it made is gone.
if command -v ceph-osd >/dev/null; then
    CEPH_MON_PORT=$(( PORT + 10 )) "$HERE/ceph-start.sh" "$OUT/ceph" >/dev/null
    CONF=$OUT/ceph/ceph.conf
    exact=0 clean=0 other=0
    for (( r = 0; r < RUNS; r++ )); do
        url="rbd:rbdpool/h$r:conf=$CONF"
        rc=0
        ( "$FERRY" convert -q -r 32M -f raw -O raw "$SRC" "$url" 2>"$OUT/err" ) & C=$!
        sleep 0.5; kill -KILL "$(cat "$OUT/ceph/run/osd.0.pid")"; sleep 0.3
        ceph-osd -c "$CONF" -i 0 2>/dev/null
        wait "$C" || rc=$?
        err=$(cat "$OUT/err")
        if (( rc == 0 )) && qemu-img compare -q -f raw -F raw "$SRC" "$url" 2>/dev/null; then exact=$((exact + 1))
        elif (( rc == 1 )) && [ "$(grep -c '^ferry: ' <<<"$err")" = 1 ] && ! rbd -c "$CONF" ls rbdpool | grep -qx "h$r"; then
            clean=$((clean + 1)); echo "hardening: failed cleanly: $err" >&2
        else other=$((other + 1)); echo "hardening: exit $rc: $err" >&2
        fi
    done
    "$HERE/ceph-stop.sh" "$OUT/ceph" >/dev/null 2>&1 || true
    OTHER_TOTAL=$((OTHER_TOTAL + other))
    echo "| OSD killed once, started again after 0.3 s | an RBD target | $RUNS | $exact | $clean | $other |"
fi
echo
echo "anything else, in all: $OTHER_TOTAL"
(( OTHER_TOTAL == 0 ))
