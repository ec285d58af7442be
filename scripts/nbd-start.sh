#!/usr/bin/env bash
# Starts nbdkit on a unix socket or on loopback TCP, for tests and benchmarks.
#
#   scripts/nbd-start.sh NAME unix|tcp:PORT [nbdkit options] [--filter=F ...] PLUGIN [PARAMS...]
#
# e.g.  scripts/nbd-start.sh src unix --filter=delay file /tmp/src.raw delay-read=2ms
#       scripts/nbd-start.sh dst tcp:10810 memory 1G
#
# State (NAME.pid, NAME.sock, NAME.log) lives in $FERRY_NBD_DIR (default /tmp/ferry-nbd).
# nbdkit writes its pid file only once it listens, so when this script returns the server
# accepts connections. Prints the URL to connect to on stdout.
# Stop it with scripts/nbd-stop.sh NAME (same FERRY_NBD_DIR).
set -euo pipefail

[ $# -ge 3 ] || { echo "usage: $0 NAME unix|tcp:PORT [nbdkit args...] PLUGIN [params...]" >&2; exit 2; }
NAME=$1 WHERE=$2
shift 2
DIR=${FERRY_NBD_DIR:-/tmp/ferry-nbd}
command -v nbdkit >/dev/null || { echo "nbd-start: nbdkit is not installed (scripts/install-deps.sh)" >&2; exit 1; }
mkdir -p "$DIR"

PID=$DIR/$NAME.pid
# A server of the same name still running is stopped first.
[ -s "$PID" ] && "$(dirname "$0")/nbd-stop.sh" "$NAME"
rm -f "$PID" "$DIR/$NAME.sock"

case $WHERE in
    unix)  LISTEN=(-U "$DIR/$NAME.sock"); URL="nbd+unix:///?socket=$DIR/$NAME.sock" ;;
    tcp:*) PORT=${WHERE#tcp:}; LISTEN=(-i 127.0.0.1 -p "$PORT"); URL="nbd://127.0.0.1:$PORT" ;;
    *)     echo "nbd-start: where must be unix or tcp:PORT, not '$WHERE'" >&2; exit 2 ;;
esac

# nbdkit forks into the background once it listens (-P writes the pid file at that point);
# its messages (and the log filter's, unless logfile= is given) go to NAME.log.
if ! nbdkit -P "$PID" "${LISTEN[@]}" "$@" >"$DIR/$NAME.log" 2>&1; then
    echo "nbd-start: nbdkit failed to start:" >&2
    cat "$DIR/$NAME.log" >&2
    exit 1
fi
for _ in $(seq 500); do
    [ -s "$PID" ] && break
    sleep 0.01
done
[ -s "$PID" ] || { echo "nbd-start: nbdkit did not write $PID within 5 s" >&2; cat "$DIR/$NAME.log" >&2; exit 1; }
echo "$URL"
