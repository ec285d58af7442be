#!/usr/bin/env bash
# Starts a user-space iSCSI target (tgtd) on loopback for Ferry's tests and benchmarks.
#
#   scripts/iscsi-start.sh [STATE_DIR]        (default /tmp/ferry-iscsi)
#
# Four targets, each with one file-backed LUN 1 (backing files in STATE_DIR, sparse):
#   iqn.2026-01.dev.ferry:thin      512-byte blocks, thin-provisioned   (STATE_DIR/thin.img)
#   iqn.2026-01.dev.ferry:thick     512-byte blocks, not thin           (STATE_DIR/thick.img)
#   iqn.2026-01.dev.ferry:thin4k    4096-byte blocks, thin-provisioned  (STATE_DIR/thin4k.img)
#   iqn.2026-01.dev.ferry:chap      512-byte blocks, thin, CHAP user ferry / password ferry-secret-1
#   iqn.2026-01.dev.ferry:readonly  512-byte blocks, write-protected (writes fail with DATA PROTECT)
# What the caller can set:
#   ISCSI_PORT=3270    portal port on 127.0.0.1
#   ISCSI_CTL=70       tgtd control port: tgtadm talks over /run/tgtd/socket.$ISCSI_CTL, so
#                      several instances (other tests, benchmarks) can run side by side
#   ISCSI_SIZE=64M     size of each LUN (backing files are created sparse, or kept if present)
#   NETNS=name         run tgtd inside network namespace NAME (created if missing), so clients
#                      in it (qemu-img next to a namespaced NFS server) reach 127.0.0.1:$ISCSI_PORT
# Prints the URLs (also written to STATE_DIR/urls). Stop with scripts/iscsi-stop.sh STATE_DIR.
# tgtd ignores SIGTERM: iscsi-stop.sh deletes the targets and asks it to exit through tgtadm.
set -euo pipefail

STATE=${1:-/tmp/ferry-iscsi}
HERE=$(cd "$(dirname "$0")" && pwd)
PORT=${ISCSI_PORT:-3270}
CTL=${ISCSI_CTL:-70}
SIZE=${ISCSI_SIZE:-64M}
BASE=iqn.2026-01.dev.ferry
NETNS=${NETNS:-}
. "$HERE/lib/servers.sh"
RUN=()
if [ -n "$NETNS" ]; then
    netns_up "$NETNS"
    RUN=(ip netns exec "$NETNS")
fi

for tool in tgtd tgtadm ss; do
    command -v "$tool" >/dev/null || { echo "iscsi-start: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done

# A target left over in this state directory goes first.
"$HERE/iscsi-stop.sh" "$STATE" >/dev/null 2>&1 || true
mkdir -p "$STATE" /run/tgtd
echo "$CTL" >"$STATE/ctl"
echo "$PORT" >"$STATE/port"

# -f: foreground (backgrounded here, so the pid is tgtd's); portal= binds loopback only.
"${RUN[@]}" setsid tgtd -f -C "$CTL" --iscsi portal=127.0.0.1:"$PORT" </dev/null >"$STATE/tgtd.log" 2>&1 &
TPID=$!
echo $TPID >"$STATE/tgtd.pid"
T=(tgtadm -C "$CTL" --lld iscsi)
for _ in $(seq 200); do "${T[@]}" --mode target --op show >/dev/null 2>&1 && break; sleep 0.02; done
if ! wait_listening "$TPID" "$PORT" "${RUN[@]}"; then
    echo "iscsi-start: tgtd did not start:" >&2; tail -5 "$STATE/tgtd.log" >&2
    "$HERE/iscsi-stop.sh" "$STATE" >/dev/null 2>&1 || true
    exit 1
fi

# add TID NAME BLOCKSIZE THIN
add() {
    local tid=$1 name=$2 bs=$3 thin=$4 img="$STATE/$2.img"
    [ -e "$img" ] || truncate -s "$SIZE" "$img"
    "${T[@]}" --mode target --op new --tid "$tid" --targetname "$BASE:$name"
    "${T[@]}" --mode logicalunit --op new --tid "$tid" --lun 1 --backing-store "$img" --bstype rdwr --blocksize "$bs"
    # thin_provisioning=1: LBPME in READ CAPACITY(16), UNMAP and WRITE SAME with UNMAP punch
    # holes in the backing file, GET LBA STATUS answers from SEEK_DATA/SEEK_HOLE.
    [ "$thin" = 1 ] && "${T[@]}" --mode logicalunit --op update --tid "$tid" --lun 1 --params thin_provisioning=1
    "${T[@]}" --mode target --op bind --tid "$tid" --initiator-address ALL
}
add 1 thin 512 1
add 2 thick 512 0
add 3 thin4k 4096 1
add 4 chap 512 1
add 5 readonly 512 1
# Write-protected: every write ends in a check condition (DATA PROTECT, WRITE PROTECTED).
"${T[@]}" --mode logicalunit --op update --tid 5 --lun 1 --params readonly=1
"${T[@]}" --mode account --op new --user ferry --password ferry-secret-1
"${T[@]}" --mode account --op bind --tid 4 --user ferry

U="iscsi://127.0.0.1:$PORT/$BASE"
URLS="$U:thin/1 $U:thick/1 $U:thin4k/1 $U:readonly/1 iscsi://ferry%ferry-secret-1@127.0.0.1:$PORT/$BASE:chap/1"
echo "$URLS" >"$STATE/urls"
echo "iscsi-start: tgtd pid $TPID (control $CTL), LUNs of $SIZE in $STATE: $URLS"
