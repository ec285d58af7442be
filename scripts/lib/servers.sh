# Shared by the scripts that start and stop test servers (sourced, not run): nbd-, nfs- and
# iscsi-start.sh / -stop.sh.

# alive PID: the process runs. An exited process not yet reaped is a zombie for a while, and
# `kill -0` still succeeds on it: the state is read from /proc/PID/stat instead.
alive() {
    [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) [ZX]' "/proc/$1/stat" 2>/dev/null
}

# end_process PID [SIGNAL [WAIT_S]]: sends SIGNAL (none: the caller has asked it to exit its
# own way), waits up to WAIT_S seconds (default 2) for it to go, then SIGKILL and up to 2 s
# more: a parent's signal mask (a test runner's) may hold SIGTERM back. Fails if it still runs.
end_process() {
    local p=$1 sig=${2:-} wait=${3:-2} i
    alive "$p" || return 0
    [ -n "$sig" ] && kill "-$sig" "$p" 2>/dev/null
    for (( i = 0; i < wait * 50; i++ )); do alive "$p" || return 0; sleep 0.02; done
    kill -KILL "$p" 2>/dev/null
    for (( i = 0; i < 100; i++ )); do alive "$p" || return 0; sleep 0.02; done
    return 1
}

# netns_up NAME [RECORD]: network namespace NAME with its loopback up, created if missing
# (then its name is written to RECORD, for the stop script to delete it).
netns_up() {
    if ! ip netns list | grep -qw "$1"; then
        ip netns add "$1"
        [ -z "${2:-}" ] || echo "$1" >"$2"
    fi
    ip -n "$1" link set lo up
}

# listening PORT [COMMAND PREFIX...]: something listens on TCP PORT (in the namespace the
# prefix, e.g. `ip netns exec NAME`, runs in).
listening() {
    local port=$1; shift
    "$@" ss -Hltn "sport = :$port" | grep -q LISTEN
}

# wait_listening PID PORT [COMMAND PREFIX...]: waits up to 10 s until PORT listens or PID
# has exited; fails unless PID runs and PORT listens.
wait_listening() {
    local p=$1 port=$2 i; shift 2
    for (( i = 0; i < 500; i++ )); do
        listening "$port" "$@" && break
        alive "$p" || break
        sleep 0.02
    done
    alive "$p" && listening "$port" "$@"
}
