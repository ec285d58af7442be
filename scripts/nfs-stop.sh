#!/usr/bin/env bash
# Stops the NFS server scripts/nfs-start.sh started with the same STATE_DIR (default
# /tmp/ferry-nfs): ganesha (SIGTERM, SIGKILL after 2 s), a portmapper it left running, and a
# network namespace it created. The exported files stay.
set -uo pipefail
STATE=${1:-/tmp/ferry-nfs}

# A zombie still answers kill -0: look at the process state instead.
alive() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }

for f in "$STATE/ganesha.pid" "$STATE/rpcbind.pid"; do
    [ -f "$f" ] || continue
    P=$(cat "$f")
    if [ -n "$P" ] && alive "$P"; then
        # SIGTERM is a clean shutdown; a parent's signal mask (a test runner's) may hold it
        # back, so SIGKILL follows after 2 s.
        kill -TERM "$P" 2>/dev/null
        for _ in $(seq 40); do alive "$P" || break; sleep 0.05; done
        alive "$P" && kill -KILL "$P" 2>/dev/null
        for _ in $(seq 40); do alive "$P" || break; sleep 0.05; done
    fi
    rm -f "$f"
done
if [ -f "$STATE/netns.created" ]; then
    ip netns del "$(cat "$STATE/netns.created")" 2>/dev/null
    rm -f "$STATE/netns.created"
fi
rm -f "$STATE/ganesha.pidf"
true
