#!/usr/bin/env bash
# Stops the NFS server scripts/nfs-start.sh started with the same STATE_DIR (default
# /tmp/ferry-nfs): ganesha (SIGTERM, SIGKILL after 2 s), a portmapper it left running, and a
# network namespace it created. The exported files stay.
set -uo pipefail
STATE=${1:-/tmp/ferry-nfs}
. "$(dirname "$0")/lib/servers.sh"

for f in "$STATE/ganesha.pid" "$STATE/rpcbind.pid"; do
    [ -f "$f" ] || continue
    P=$(cat "$f")
    # SIGTERM is a clean shutdown.
    [ -n "$P" ] && end_process "$P" TERM
    rm -f "$f"
done
if [ -f "$STATE/netns.created" ]; then
    ip netns del "$(cat "$STATE/netns.created")" 2>/dev/null
    rm -f "$STATE/netns.created"
fi
rm -f "$STATE/ganesha.pidf"
true
