#!/usr/bin/env bash
# Stops the tgtd scripts/iscsi-start.sh started with the same STATE_DIR (default
# /tmp/ferry-iscsi). tgtd ignores SIGTERM: its targets are deleted (--force drops sessions)
# and it is told to exit through its control socket; SIGKILL only if that fails.
# The backing files stay.
set -uo pipefail
STATE=${1:-/tmp/ferry-iscsi}
[ -f "$STATE/tgtd.pid" ] || exit 0
P=$(cat "$STATE/tgtd.pid")
CTL=$(cat "$STATE/ctl" 2>/dev/null || echo 70)
T=(tgtadm -C "$CTL" --lld iscsi)
. "$(dirname "$0")/lib/servers.sh"
if [ -n "$P" ] && alive "$P"; then
    for tid in $("${T[@]}" --mode target --op show 2>/dev/null | sed -n 's/^Target \([0-9]*\):.*/\1/p'); do
        "${T[@]}" --mode target --op delete --force --tid "$tid" >/dev/null 2>&1
    done
    "${T[@]}" --mode system --op delete >/dev/null 2>&1
    end_process "$P" "" 3
fi
rm -f "$STATE/tgtd.pid"
true
