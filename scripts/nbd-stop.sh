#!/usr/bin/env bash
# Stops an nbdkit started by scripts/nbd-start.sh NAME (same FERRY_NBD_DIR).
#
#   scripts/nbd-stop.sh NAME...
#
# SIGTERM by the pid in its pid file, then SIGKILL if it is still alive after 2 s. "Alive"
# is read from /proc/PID/stat: an exited process not yet reaped is a zombie for a while, and
# `kill -0` would still succeed on it. Removes the pid file and socket (nbdkit leaves them).
set -uo pipefail

DIR=${FERRY_NBD_DIR:-/tmp/ferry-nbd}
alive() {
    local state
    [ -r "/proc/$1/stat" ] || return 1
    # The state is the field after the parenthesised command name (which may hold spaces).
    state=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

status=0
for NAME in "$@"; do
    PIDFILE=$DIR/$NAME.pid
    if P=$(cat "$PIDFILE" 2>/dev/null) && [ -n "$P" ]; then
        # Only a process that is nbdkit (a stale pid file may name a reused pid).
        if alive "$P" && grep -q nbdkit "/proc/$P/comm" 2>/dev/null; then
            kill -TERM "$P" 2>/dev/null
            for _ in $(seq 100); do alive "$P" || break; sleep 0.02; done
            if alive "$P"; then
                kill -KILL "$P" 2>/dev/null
                for _ in $(seq 100); do alive "$P" || break; sleep 0.02; done
            fi
            alive "$P" && { echo "nbd-stop: nbdkit $NAME (pid $P) is still running" >&2; status=1; }
        fi
    fi
    rm -f "$PIDFILE" "$DIR/$NAME.sock"
done
exit $status
