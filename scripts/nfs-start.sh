#!/usr/bin/env bash
# Starts a user-space NFS server (nfs-ganesha, FSAL VFS) for Ferry's tests and benchmarks.
#
#   scripts/nfs-start.sh [STATE_DIR]        (default /tmp/ferry-nfs)
#
# Two exports: STATE_DIR/export as /export (read-write) and STATE_DIR/export-ro as /export-ro
# (read-only). NFSv3 and v4 on one port. What the caller can set:
#   NFS_PORT=2051 MOUNT_PORT=20051   ports on 127.0.0.1 (NFS and MOUNT)
#   NFS_VERSIONS="3, 4"              or "4": NFSv4 only, which needs no rpcbind
#   NETNS=name                       run the server inside network namespace NAME with a
#                                    portmapper on its port 111 and the standard ports
#                                    2049/20048, for clients without port options (qemu-img):
#                                    `ip netns exec NAME qemu-img ... nfs://127.0.0.1/export/F`
# Prints the base URLs (also written to STATE_DIR/urls). Stop with scripts/nfs-stop.sh STATE_DIR.
#
# Why the rpcbind dance: ganesha refuses to serve NFSv3 unless it can register with rpcbind,
# rpcbind listens on every address of its namespace and only one can run per machine (lock in
# /run). So without NETNS, rpcbind runs only while ganesha starts, in a throw-away namespace
# (ganesha registers through /run/rpcbind.sock, which is not per namespace), and is stopped
# once ganesha has registered. With NETNS, rpcbind stays up inside that namespace.
set -euo pipefail

STATE=${1:-/tmp/ferry-nfs}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib/servers.sh"
VERSIONS=${NFS_VERSIONS:-3, 4}
NETNS=${NETNS:-}
if [ -n "$NETNS" ]; then
    PORT=2049; MNT=20048; BIND=""   # inside a namespace Bind_addr=127.0.0.1 fails; 0.0.0.0 is its loopback only
else
    PORT=${NFS_PORT:-2051}; MNT=${MOUNT_PORT:-20051}; BIND="Bind_addr = 127.0.0.1;"
fi
[[ "$VERSIONS" == *3* ]] || MNT=0

for tool in ganesha.nfsd ip ss; do
    command -v "$tool" >/dev/null || { echo "nfs-start: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
if [[ "$VERSIONS" == *3* ]]; then
    command -v rpcbind >/dev/null || { echo "nfs-start: rpcbind is missing: run scripts/install-deps.sh" >&2; exit 1; }
fi

# A server left over in this state directory goes first.
"$HERE/nfs-stop.sh" "$STATE" >/dev/null 2>&1 || true
mkdir -p "$STATE/export" "$STATE/export-ro" "$STATE/recovery" /var/run/ganesha
: >"$STATE/ganesha.log"

cat >"$STATE/ganesha.conf" <<CONF
NFS_CORE_PARAM {
    Protocols = $VERSIONS;
    $BIND
    NFS_Port = $PORT;
    MNT_Port = $MNT;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;
}
NFSV4 { Graceless = true; RecoveryBackend = fs; RecoveryRoot = $STATE/recovery; Only_Numeric_Owners = true; }
EXPORT_DEFAULTS {
    Protocols = $VERSIONS;
    Transports = TCP;
    Squash = No_Root_Squash;
    SecType = sys;
    # libnfs 4.0 breaks on ganesha's 64 MiB default; 1 MiB is what real servers offer.
    MaxRead = 1048576; MaxWrite = 1048576; PrefRead = 1048576; PrefWrite = 1048576;
    # Sizes of files changed behind ganesha's back (tests write the export directly).
    Attr_Expiration_Time = 0;
}
EXPORT { Export_Id = 1; Path = $STATE/export; Pseudo = /export; Access_Type = RW; FSAL { Name = VFS; } }
EXPORT { Export_Id = 2; Path = $STATE/export-ro; Pseudo = /export-ro; Access_Type = RO; FSAL { Name = VFS; } }
LOG { Default_Log_Level = EVENT; }
CONF

RUN=()
RPCNS=""
if [ -n "$NETNS" ]; then
    netns_up "$NETNS" "$STATE/netns.created"
    RUN=(ip netns exec "$NETNS")
    RPCNS=$NETNS
elif [[ "$VERSIONS" == *3* ]]; then
    RPCNS=ferry-rpcb-$$
fi

# One rpcbind per machine: serialize the start-ups that need one.
exec 9>/run/ferry-nfs-rpcbind.lock
if [ -n "$RPCNS" ]; then
    flock -w 60 9 || { echo "nfs-start: another NFS server start holds the rpcbind lock" >&2; exit 1; }
    # A stopped rpcbind can linger as a zombie until whoever adopted it reaps it: only a live
    # one counts (see alive).
    live=
    for p in $(pgrep -x rpcbind); do alive "$p" && live=$p; done
    if [ -e /run/rpcbind.lock ] && [ -n "$live" ]; then
        echo "nfs-start: an rpcbind is already running (another NETNS server?); ganesha would register with it" >&2
        exit 1
    fi
    [ -n "$NETNS" ] || netns_up "$RPCNS"
    ip netns exec "$RPCNS" setsid rpcbind -f -w </dev/null >"$STATE/rpcbind.log" 2>&1 9>&- &
    echo $! >"$STATE/rpcbind.pid"
    disown $!   # no "Killed" job notice when it is stopped below
    for _ in $(seq 200); do ip netns exec "$RPCNS" rpcinfo -p 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.02; done
fi

"${RUN[@]}" setsid ganesha.nfsd -F -f "$STATE/ganesha.conf" -L "$STATE/ganesha.log" -p "$STATE/ganesha.pidf" \
    </dev/null >"$STATE/ganesha.out" 2>&1 9>&- &
GPID=$!
disown $GPID
echo $GPID >"$STATE/ganesha.pid"
wait_listening "$GPID" "$PORT" "${RUN[@]}" || true
if [ -n "$RPCNS" ]; then
    for _ in $(seq 200); do ip netns exec "$RPCNS" rpcinfo -p 127.0.0.1 2>/dev/null | grep -q mountd && break; sleep 0.02; done
    if [ -z "$NETNS" ]; then
        # Registered: the portmapper and its namespace are no longer needed.
        # SIGKILL: it keeps nothing worth a clean exit, and a parent's signal mask (a test
        # runner's) can hold SIGTERM back from it.
        end_process "$(cat "$STATE/rpcbind.pid")" KILL 0 || true
        rm -f "$STATE/rpcbind.pid"
        ip netns del "$RPCNS"
    fi
fi
flock -u 9
if ! alive "$GPID" || ! listening "$PORT" "${RUN[@]}"; then
    echo "nfs-start: ganesha did not start:" >&2
    tail -n 5 "$STATE/ganesha.log" "$STATE/ganesha.out" >&2
    "$HERE/nfs-stop.sh" "$STATE" >/dev/null 2>&1 || true
    exit 1
fi

if [ -n "$NETNS" ]; then
    URLS="nfs://127.0.0.1/export nfs://127.0.0.1/export-ro (inside netns $NETNS)"
elif [[ "$VERSIONS" == *3* ]]; then
    URLS="nfs://127.0.0.1/export/FILE?nfsport=$PORT&mountport=$MNT nfs://127.0.0.1/export/FILE?version=4&nfsport=$PORT"
else
    URLS="nfs://127.0.0.1/export/FILE?version=4&nfsport=$PORT"
fi
echo "$URLS" >"$STATE/urls"
echo "nfs-start: ganesha pid $GPID, exports $STATE/export (rw) and $STATE/export-ro (ro): $URLS"
