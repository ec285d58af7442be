#!/usr/bin/env bash
# Stops an nbdkit started by scripts/nbd-start.sh NAME (same FERRY_NBD_DIR).
#
#   scripts/nbd-stop.sh NAME...
#
# SIGTERM by the pid in its pid file, then SIGKILL if it is still alive after 2 s. "Alive"
# is read from /proc/PID/stat: an exited process not yet reaped is a zombie for a while, and
# `kill -0` would still succeed on it. Removes the pid file and socket (nbdkit leaves them).
set -uo pipefail

. "$(dirname "$0")/lib/servers.sh"
DIR=${FERRY_NBD_DIR:-/tmp/ferry-nbd}

status=0
for NAME in "$@"; do
    PIDFILE=$DIR/$NAME.pid
    if P=$(cat "$PIDFILE" 2>/dev/null) && [ -n "$P" ]; then
        # Only a process that is nbdkit (a stale pid file may name a reused pid).
        if alive "$P" && grep -q nbdkit "/proc/$P/comm" 2>/dev/null; then
            end_process "$P" TERM || { echo "nbd-stop: nbdkit $NAME (pid $P) is still running" >&2; status=1; }
        fi
    fi
    rm -f "$PIDFILE" "$DIR/$NAME.sock"
done
exit $status
