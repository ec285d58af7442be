#!/usr/bin/env bash
# Starts a single-node Ceph cluster for Ferry's RBD tests and benchmarks: one monitor, one
# manager and one bluestore OSD on a sparse file, loopback only, cephx on, and a replicated
# pool of size 1 initialised for RBD.
#
#   scripts/ceph-start.sh [STATE_DIR]      (default /tmp/ferry-ceph)
#
# What the caller can set:
#   CEPH_MON_PORT=40300                          the monitor's msgr2 port; the ports after it
#                                                are the cluster's: msgr1 (+1), and the OSD
#                                                and manager bind in +2 to +200
#   CEPH_MON_PORT_V1, CEPH_PORT_MIN, CEPH_PORT_MAX   to place those elsewhere
#   CEPH_POOL=rbdpool                            the RBD pool
#   CEPH_OSD_SIZE=20G                            the OSD's sparse block file
# Writes STATE_DIR/ceph.conf (whose [client] section names the admin keyring, so
# `rbd:POOL/IMAGE:conf=STATE_DIR/ceph.conf` is all a client needs) and prints it.
# Stop with scripts/ceph-stop.sh STATE_DIR.
set -euo pipefail

STATE=${1:-/tmp/ferry-ceph}
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib/servers.sh"
MON=${CEPH_MON_PORT:-40300}
MON1=${CEPH_MON_PORT_V1:-$(( MON + 1 ))}
PMIN=${CEPH_PORT_MIN:-$(( MON + 2 ))}
PMAX=${CEPH_PORT_MAX:-$(( MON + 200 ))}
POOL=${CEPH_POOL:-rbdpool}
OSD_SIZE=${CEPH_OSD_SIZE:-20G}

for tool in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool rbd; do
    command -v "$tool" >/dev/null || { echo "ceph-start: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done

"$HERE/ceph-stop.sh" "$STATE" >/dev/null 2>&1 || true
rm -rf "$STATE"
mkdir -p "$STATE"/{mon.a,mgr.x,osd.0,run,log,crash}
CONF=$STATE/ceph.conf
FSID=$(cat /proc/sys/kernel/random/uuid)

# Pool size 1 and no health warnings about it: a single OSD cannot replicate. The OSD's
# memory target is kept low, since tests run beside it on a small machine.
cat >"$CONF" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$MON,v1:127.0.0.1:$MON1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
ms bind port min = $PMIN
ms bind port max = $PMAX
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $STATE/keyring.\$name
admin socket = $STATE/run/\$name.asok
pid file = $STATE/run/\$name.pid
log file = $STATE/log/\$name.log
run dir = $STATE/run
crash dir = $STATE/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 5
mon warn on insecure global id reclaim allowed = false
auth allow insecure global id reclaim = false
[mon]
mon data = $STATE/mon.\$id
mon cluster log file = $STATE/log/cluster.log
[mgr]
mgr data = $STATE/mgr.\$id
[osd]
osd data = $STATE/osd.\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_SIZE
bluestore block db create = false
bluestore block wal create = false
osd memory target = 1073741824
osd crush update on start = true
[client]
keyring = $STATE/keyring.client.admin
CONF
CEPH=(ceph -c "$CONF" --connect-timeout 10)

# Keys: the monitor's, and an admin that may do anything.
ceph-authtool --create-keyring "$STATE/keyring.mon.a" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$STATE/keyring.client.admin" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool "$STATE/keyring.mon.a" --import-keyring "$STATE/keyring.client.admin" >/dev/null

monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MON,v1:127.0.0.1:$MON1]" "$STATE/monmap" >/dev/null
ceph-mon -c "$CONF" --mkfs -i a --monmap "$STATE/monmap" --keyring "$STATE/keyring.mon.a"
# The daemons' start-up chatter goes to their logs, not the caller's terminal.
ceph-mon -c "$CONF" -i a 2>>"$STATE/log/start.log"
for _ in $(seq 60); do "${CEPH[@]}" mon stat >/dev/null 2>&1 && break; sleep 0.5; done
"${CEPH[@]}" mon stat >/dev/null

"${CEPH[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' -o "$STATE/keyring.mgr.x"
ceph-mgr -c "$CONF" -i x 2>>"$STATE/log/start.log"

OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
OSD_KEY=$(ceph-authtool --gen-print-key)
ID=$(echo "{\"cephx_secret\": \"$OSD_KEY\"}" | "${CEPH[@]}" osd new "$OSD_UUID" -i -)
[ "$ID" = 0 ] || { echo "ceph-start: the OSD got id $ID, not 0" >&2; exit 1; }
ceph-authtool --create-keyring "$STATE/keyring.osd.0" --name osd.0 --add-key "$OSD_KEY" >/dev/null
ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$STATE/log/osd.0.mkfs" 2>&1 \
    || { cat "$STATE/log/osd.0.mkfs" >&2; exit 1; }
ceph-osd -c "$CONF" -i 0 2>>"$STATE/log/start.log"
for _ in $(seq 120); do "${CEPH[@]}" osd stat -f json 2>/dev/null | grep -q '"num_up_osds":1' && break; sleep 0.5; done

"${CEPH[@]}" osd pool create "$POOL" 8 8 >/dev/null 2>&1
"${CEPH[@]}" osd pool application enable "$POOL" rbd >/dev/null 2>&1
rbd -c "$CONF" pool init "$POOL"
# Ready when an object can be written (the placement groups are active).
for _ in $(seq 120); do
    timeout 10 rados -c "$CONF" -p "$POOL" put ferry-probe /etc/hostname 2>/dev/null && break; sleep 0.5
done
rados -c "$CONF" -p "$POOL" rm ferry-probe
echo "$CONF"
