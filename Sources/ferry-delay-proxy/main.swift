// ferry-delay-proxy: a TCP proxy on loopback that adds latency, for benchmarks of the NFS and
// iSCSI paths (this kernel has no netem).
//
//   ferry-delay-proxy LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS [LISTEN_PORT TARGET_HOST:TARGET_PORT ...]
//
// Listens on 127.0.0.1:LISTEN_PORT and forwards every connection to TARGET_HOST:TARGET_PORT,
// holding each chunk of bytes DELAY_MS (fractions allowed) in each direction: a round trip
// grows by 2 x DELAY_MS. Bytes are delayed, not serialized: each direction keeps a queue of
// chunks stamped with the time they may leave, so a window full of requests crosses the link
// together, as on a real long-latency network. One thread per connection pair polls both
// sockets; the bytes wait in a pipe (splice: the proxy never copies them), and a direction
// stops reading while its pipe is full (16 MiB as root, else pipe-max-size: backpressure).
// At 0 ms each direction is a blocking splice loop of its own.
// Prints "ferry-delay-proxy: listening ..." once every port listens. Stop it with SIGTERM.

import CFerryLinux
import FerryCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

func fail(_ message: String) -> Never {
    FileHandleStderr.write("ferry-delay-proxy: \(message)\n")
    exit(2)
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var s = s
        s.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }
}

func setNoDelay(_ fd: Int32) {
    var one: Int32 = 1
    _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
}

func setNonBlocking(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
}

struct Route: Sendable {
    var listenPort: UInt16
    var host: String
    var port: UInt16
}

/// The target's addresses, resolved once.
func resolve(_ host: String, _ port: UInt16) -> [UInt8] {
    var hints = addrinfo()
    hints.ai_family = AF_INET
    hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
    var res: UnsafeMutablePointer<addrinfo>?
    guard getaddrinfo(host, String(port), &hints, &res) == 0, let r = res, let a = r.pointee.ai_addr else {
        fail("cannot resolve \(host)")
    }
    defer { freeaddrinfo(res) }
    return Array(UnsafeRawBufferPointer(start: a, count: Int(r.pointee.ai_addrlen)))
}

/// One delayed direction. Bytes go from `from` into a pipe at once, stamped with the time they
/// may leave, and from the pipe to `to` when due: the pipe is the queue, so the bytes never
/// enter the proxy (splice), and a full pipe stops the reading (backpressure).
final class Direction {
    let from: Int32
    let to: Int32
    /// The pipe's write and read ends.
    let pipeIn: Int32
    let pipeOut: Int32
    /// What entered the pipe, in order: when it may leave and how many bytes (0: the end of
    /// the stream).
    var stamps: [(due: UInt64, bytes: Int)] = []
    var head = 0
    /// Bytes of the first stamp already sent.
    var sent = 0
    var readClosed = false
    /// The pipe took nothing: wait until it has room (POLLOUT on its write end).
    var pipeFull = false
    var done = false

    init(from: Int32, to: Int32, pipe: [Int32]) {
        self.from = from; self.to = to
        pipeOut = pipe[0]; pipeIn = pipe[1]
    }

    var hasQueued: Bool { head < stamps.count }

    /// Reads what the socket has into the pipe. False: the connection is broken.
    func fill(delay: UInt64) -> Bool {
        let n = ferry_splice(from, pipeIn, 1 << 20, 1)
        if n > 0 {
            stamps.append((monotonicNanoseconds() + delay, n))
        } else if n == 0 {
            readClosed = true
            stamps.append((monotonicNanoseconds() + delay, 0))
        } else if n == -Int(EAGAIN) {
            // Nothing to read, or no room in the pipe: with bytes queued, assume the latter and
            // let poll on the pipe say when there is room (at once, if there was).
            pipeFull = hasQueued
        } else if n != -Int(EINTR) {
            return false
        }
        return true
    }

    /// Sends every due byte the socket takes now. False: the connection is broken.
    func drain(now: UInt64) -> Bool {
        while hasQueued && stamps[head].due <= now {
            if stamps[head].bytes == 0 {
                shutdown(to, Int32(SHUT_WR))
                done = true
                head += 1
                return true
            }
            // All that is due, up to the end of the stream, in one call.
            var due = -sent
            var k = head
            while k < stamps.count && stamps[k].due <= now && stamps[k].bytes > 0 {
                due += stamps[k].bytes
                k += 1
            }
            let m = ferry_splice(pipeOut, to, due, 1)
            if m == -Int(EAGAIN) || m == -Int(EINTR) { break }
            if m <= 0 { return false }
            pipeFull = false
            var left = m
            while left > 0 {
                let rest = stamps[head].bytes - sent
                if left < rest { sent += left; break }
                left -= rest
                sent = 0
                head += 1
            }
            if m < due { break }
        }
        if head > 64 && head * 2 > stamps.count {
            stamps.removeFirst(head)
            head = 0
        }
        return true
    }
}

/// Pumps both directions of one client connection until both ends have closed.
func serve(client: Int32, target: [UInt8], delay: UInt64) {
    let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard server >= 0 else { close(client); return }
    let connected = target.withUnsafeBytes { raw in
        connect(server, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(raw.count))
    }
    guard connected == 0 else { close(server); close(client); return }
    setNoDelay(client); setNoDelay(server)
    if delay == 0 {
        splicePair(client, server)
        return
    }
    var pipes: [[Int32]] = []
    defer {
        for p in pipes { close(p[0]); close(p[1]) }
        close(client); close(server)
    }
    for _ in 0 ..< 2 {
        var p: [Int32] = [0, 0]
        guard ferry_pipe(&p, Int32(delayPipeSize)) == 0 else { return }
        pipes.append(p)
    }
    setNonBlocking(client); setNonBlocking(server)
    let dirs = [Direction(from: client, to: server, pipe: pipes[0]), Direction(from: server, to: client, pipe: pipes[1])]
    // The two sockets, then each direction's pipe (for room to read into).
    let descriptors = [client, server, dirs[0].pipeIn, dirs[1].pipeIn]
    var fds = descriptors.map { pollfd(fd: $0, events: 0, revents: 0) }
    while !(dirs[0].done && dirs[1].done) {
        let now = monotonicNanoseconds()
        var timeout: Int64 = -1
        for i in fds.indices { fds[i] = pollfd(fd: descriptors[i], events: 0, revents: 0) }
        for (i, d) in dirs.enumerated() {
            // Reads come in on socket i, writes go out on the other one.
            if !d.readClosed {
                if d.pipeFull { fds[2 + i].events |= Int16(POLLOUT) } else { fds[i].events |= Int16(POLLIN) }
            }
            if d.hasQueued {
                let due = d.stamps[d.head].due
                if due <= now {
                    fds[1 - i].events |= Int16(POLLOUT)
                } else {
                    let wait = Int64(min(due - now, UInt64(Int64.max)))
                    timeout = timeout < 0 ? wait : min(timeout, wait)
                }
            }
        }
        // A socket that hung up reports it even when nothing is asked: leave out the quiet ones,
        // or a closed end spins the loop until the other direction is done.
        for i in fds.indices where fds[i].events == 0 { fds[i].fd = -1 }
        // To the nanosecond: poll(2)'s whole milliseconds held a chunk due in 0.2 ms for 1 ms.
        let rc = fds.withUnsafeMutableBytes { ferry_poll_ns($0.baseAddress, 4, timeout) }
        if rc < 0 {
            if rc == -EINTR { continue }
            return
        }
        for (i, d) in dirs.enumerated() {
            if d.pipeFull && fds[2 + i].revents != 0 { d.pipeFull = false }
            if !d.readClosed && !d.pipeFull && fds[i].revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                // A reset: the whole pair goes.
                guard d.fill(delay: delay) else { return }
            }
            let out = fds[1 - i].revents
            if out & Int16(POLLERR) != 0 && out & Int16(POLLIN) == 0 { return }
            guard d.drain(now: monotonicNanoseconds()) else { return }
        }
    }
}

/// The zero-delay route: bytes move socket -> pipe -> socket inside the kernel (splice), so
/// the proxy copies nothing itself, one blocking thread per direction (no poll calls): on a
/// small machine every cycle the proxy spends is taken from the copy it measures.
func splicePair(_ client: Int32, _ server: Int32) {
    /// Directions still running: the last one out closes both sockets.
    final class Running: Sendable { let count = Atomic<Int>(2) }
    let running = Running()
    @Sendable func pump(_ from: Int32, _ to: Int32) {
        defer {
            if running.count.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 { close(client); close(server) }
        }
        var p: [Int32] = [0, 0]
        guard ferry_pipe(&p, Int32(pipeSize)) == 0 else {
            shutdown(client, Int32(SHUT_RDWR)); shutdown(server, Int32(SHUT_RDWR))
            return
        }
        defer { close(p[0]); close(p[1]) }
        while true {
            let n = ferry_splice(from, p[1], pipeSize, 0)
            if n == -Int(EINTR) { continue }
            if n <= 0 {
                // End of stream: pass it on. An error: take the other direction down too.
                if n == 0 { shutdown(to, Int32(SHUT_WR)) } else { shutdown(client, Int32(SHUT_RDWR)); shutdown(server, Int32(SHUT_RDWR)) }
                return
            }
            var held = n
            while held > 0 {
                let m = ferry_splice(p[0], to, held, 0)
                if m == -Int(EINTR) { continue }
                if m <= 0 {
                    shutdown(client, Int32(SHUT_RDWR)); shutdown(server, Int32(SHUT_RDWR))
                    return
                }
                held -= m
            }
        }
    }
    if !startDetachedThread(name: "proxy-splice", { pump(server, client) }) {
        running.count.store(1, ordering: .relaxed)
        shutdown(client, Int32(SHUT_RDWR))
    }
    pump(client, server)
}

let pipeSize = 1 << 20
/// A delayed direction's queue: what one delay at several GB/s holds. Above pipe-max-size
/// only with CAP_SYS_RESOURCE; `ferry_pipe` settles for the largest it is allowed.
let delayPipeSize = 16 << 20

// MARK: main

_ = signal(SIGPIPE, SIG_IGN)
var args = Array(CommandLine.arguments.dropFirst())
if args.first == "-h" || args.first == "--help" || args.count < 3 || args.count % 3 != 0 {
    print("usage: ferry-delay-proxy LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS [LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_MS ...]")
    exit(args.first == "-h" || args.first == "--help" ? 0 : 2)
}

var listeners: [(fd: Int32, target: [UInt8], delay: UInt64, route: Route)] = []
while !args.isEmpty {
    let spec = Array(args.prefix(3))
    args.removeFirst(3)
    guard let lport = UInt16(spec[0]) else { fail("bad listen port '\(spec[0])'") }
    guard let colon = spec[1].lastIndex(of: ":"), let tport = UInt16(spec[1][spec[1].index(after: colon)...]) else {
        fail("bad target '\(spec[1])' (HOST:PORT)")
    }
    guard let ms = Double(spec[2]), ms >= 0 else { fail("bad delay '\(spec[2])' (milliseconds)") }
    let host = String(spec[1][..<colon])
    let route = Route(listenPort: lport, host: host, port: tport)
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var one: Int32 = 1
    _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = lport.bigEndian
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    let bound = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0, listen(fd, 128) == 0 else { fail("cannot listen on 127.0.0.1:\(lport): \(String(cString: strerror(errno)))") }
    listeners.append((fd, resolve(host, tport), UInt64(ms * 1_000_000), route))
}
do {
    var line = "ferry-delay-proxy: listening: " + listeners.map { "127.0.0.1:\($0.route.listenPort) -> \($0.route.host):\($0.route.port) +\(Double($0.delay) / 1e6) ms each way" }.joined(separator: ", ") + "\n"
    line.withUTF8 { _ = write(1, $0.baseAddress, $0.count) }
}

var pfds = listeners.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
while true {
    if poll(&pfds, nfds_t(pfds.count), -1) < 0 { continue }
    for (i, p) in pfds.enumerated() where p.revents != 0 {
        let client = accept(p.fd, nil, nil)
        guard client >= 0 else { continue }
        let target = listeners[i].target
        let delay = listeners[i].delay
        if !startDetachedThread(name: "proxy-conn", { serve(client: client, target: target, delay: delay) }) {
            close(client)
        }
    }
}
