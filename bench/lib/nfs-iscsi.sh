# Shared by bench/iscsi.sh and bench/defaults.sh (sourced, not run): nfs-ganesha (NFSv3, 1 MiB
# rsize/wsize) and tgtd (file-backed LUNs) inside one private network namespace with a
# portmapper on its port 111 (qemu-img 7.2's nfs:// takes no port options), and
# ferry-delay-proxy in front of both for the lines with added latency.
#
#   rig_check                  exits with a message unless PROXY and qemu-img's nfs and iscsi
#                              drivers are there
#   rig_dirs DIR               NFSSTATE (DIR/nfs, its export in NFSSTATE/export) and ISTATE
#                              (DIR/iscsi, the LUNs' files), made; fill them, then rig_start
#   rig_start SIZE_MIB DELAY_MS the servers (LUNs of SIZE_MIB; a LUN file already there is
#                              kept) and the proxy; IN is the prefix that runs a command in
#                              the namespace
#   rig_stop                   stops all of it (safe to call twice, or before rig_start)
#   rig_ports DELAY            "iSCSI NFS MOUNT" ports to reach: 0 direct, p0 through the
#                              proxy at 0 ms, anything else through the proxy at DELAY_MS
#   rig_pmap DELAY             points the portmapper's NFS and MOUNT entries at those ports,
#                              for qemu-img (Ferry takes nfsport= and mountport= instead)
# Needs HERE (the bench directory), NETNS (the namespace's name) and PROXY (ferry-delay-proxy).

RIG_LUN=iqn.2026-01.dev.ferry:thin
RIG_BACK=iqn.2026-01.dev.ferry:thick
RIG_PROXY_PID=

rig_check() {
    [ -x "$PROXY" ] || { echo "bench: no ferry-delay-proxy at $PROXY (swift build -c release)" >&2; exit 1; }
    qemu-img --help | grep -qw nfs || { echo "bench: qemu-img has no nfs driver (install qemu-block-extra)" >&2; exit 1; }
    qemu-img --help | grep -qw iscsi || { echo "bench: qemu-img has no iscsi driver (install qemu-block-extra)" >&2; exit 1; }
}

rig_dirs() {
    NFSSTATE=$1/nfs
    ISTATE=$1/iscsi
    RIG_LOG=$1/proxy.log
    mkdir -p "$NFSSTATE/export" "$ISTATE"
}

rig_start() {
    local size_mib=$1 delay=$2
    IN=(ip netns exec "$NETNS")
    NETNS=$NETNS "$HERE/../scripts/nfs-start.sh" "$NFSSTATE" >&2
    NETNS=$NETNS ISCSI_PORT=3260 ISCSI_CTL=60 ISCSI_SIZE="${size_mib}M" "$HERE/../scripts/iscsi-start.sh" "$ISTATE" >&2
    "${IN[@]}" setsid "$PROXY" 3360 127.0.0.1:3260 "$delay" 3049 127.0.0.1:2049 "$delay" 30048 127.0.0.1:20048 "$delay" \
        4360 127.0.0.1:3260 0 4049 127.0.0.1:2049 0 40048 127.0.0.1:20048 0 >"$RIG_LOG" 2>&1 </dev/null &
    RIG_PROXY_PID=$!
    for _ in $(seq 200); do grep -q listening "$RIG_LOG" && break; sleep 0.02; done
    grep -q listening "$RIG_LOG" || { echo "bench: the proxy did not start: $(cat "$RIG_LOG")" >&2; exit 1; }
}

rig_stop() {
    [ -n "$RIG_PROXY_PID" ] && kill "$RIG_PROXY_PID" 2>/dev/null
    RIG_PROXY_PID=
    "$HERE/../scripts/iscsi-stop.sh" "$ISTATE" >/dev/null 2>&1 || true
    "$HERE/../scripts/nfs-stop.sh" "$NFSSTATE" >/dev/null 2>&1 || true
}

rig_ports() { case $1 in 0) echo "3260 2049 20048";; p0) echo "4360 4049 40048";; *) echo "3360 3049 30048";; esac; }

# Portmapper entries for NFSv3 (100003) and MOUNT (100005 v1 and v3): UNSET then SET, portmap
# v2 over TCP from a reserved port (rpcbind accepts changes from root on loopback only).
rig_pmap() {
    local _ip np mp
    read -r _ip np mp <<<"$(rig_ports "$1")"
    "${IN[@]}" python3 - "$np" "$mp" <<'PY'
import random, socket, struct, sys
nfs, mnt = int(sys.argv[1]), int(sys.argv[2])
def rpc(proc, prog, vers, port):
    s = socket.socket()
    for p in range(1023, 511, -1):
        try:
            s.bind(("127.0.0.1", p)); break
        except OSError:
            pass
    s.connect(("127.0.0.1", 111))
    call = struct.pack(">6I", random.getrandbits(32), 0, 2, 100000, 2, proc)   # CALL, rpc v2, portmap v2
    call += struct.pack(">4I", 0, 0, 0, 0)                                        # AUTH_NONE cred and verifier
    call += struct.pack(">4I", prog, vers, 6, port)                               # the mapping, TCP
    s.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
    n = struct.unpack(">I", s.recv(4))[0] & 0x7fffffff
    reply = b""
    while len(reply) < n:
        reply += s.recv(n - len(reply))
    s.close()
    return struct.unpack(">I", reply[-4:])[0] == 1
for prog, vers, port in ((100003, 3, nfs), (100005, 3, mnt), (100005, 1, mnt)):
    rpc(2, prog, vers, 0)
    if not rpc(1, prog, vers, port):
        sys.exit("portmapper SET %d v%d -> %d failed" % (prog, vers, port))
PY
}
