#!/usr/bin/env bash
# Stops the cluster scripts/ceph-start.sh started with the same STATE_DIR (default
# /tmp/ferry-ceph): the OSD, the manager, then the monitor (SIGTERM, a clean shutdown;
# SIGKILL after 20 s). Its data stays until the next start.
set -uo pipefail
STATE=${1:-/tmp/ferry-ceph}
. "$(dirname "$0")/lib/servers.sh"

for name in osd.0 mgr.x mon.a; do
    f=$STATE/run/$name.pid
    [ -f "$f" ] || continue
    P=$(cat "$f")
    # A stopped daemon (a test's SIGSTOP) must be woken to see the SIGTERM.
    [ -n "$P" ] && { kill -CONT "$P" 2>/dev/null; end_process "$P" TERM 20; }
    rm -f "$f"
done
true
