#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The thread-and-queue half of a network endpoint's connection: a C library context (libnbd,
/// libnfs, libiscsi) is not thread-safe, so one event-loop thread owns it; callers post items
/// to this queue and wake the loop through a pipe; the loop polls the pipe beside the
/// library's socket and issues what was posted.
///
/// Lifecycle: `post` until `stop` (or the loop's own end); the loop calls `finish` once, which
/// hands back what was still queued, makes later posts fail with the same error, and resumes
/// every `stop` waiter.
public final class EventLoopQueue<Item>: @unchecked Sendable {
    /// The read end of the wake-up pipe: the loop polls it for POLLIN.
    public let wakeFd: Int32
    private let wakeWrite: Int32
    /// The connection's name (its URL) for messages.
    public let name: String

    private struct Shared {
        var queue: [Item] = []
        /// A wake-up byte is on its way; later posts need not write another.
        var signaled = false
        var stopping = false
        var finished: FerryError?
        var onStopped: [@Sendable () -> Void] = []
    }
    private let shared = Locked(Shared())

    /// Makes the wake-up pipe (non-blocking, close-on-exec).
    public init(name: String) throws {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw FerryError.posix(errno, "pipe", path: name) }
        for fd in fds {
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        wakeFd = fds[0]
        wakeWrite = fds[1]
        self.name = name
    }

    deinit {
        close(wakeFd)
        close(wakeWrite)
    }

    /// Queues `item` for the loop. Returns the error to fail it with instead when the loop is
    /// stopping or has finished.
    public func post(_ item: Item) -> FerryError? {
        let outcome: (wake: Bool, failed: FerryError?) = shared.withLock { s in
            if let f = s.finished { return (false, f) }
            if s.stopping { return (false, FerryError(.other, "the connection is closing", path: name)) }
            s.queue.append(item)
            defer { s.signaled = true }
            return (!s.signaled, nil)
        }
        if outcome.wake { wake() }
        return outcome.failed
    }

    /// Asks the loop to let what is in flight finish and end, and waits until it has.
    public func stop() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let already: Bool = shared.withLock { s in
                if s.finished != nil { return true }
                s.stopping = true
                s.onStopped.append { continuation.resume() }
                return false
            }
            if already { continuation.resume() } else { wake() }
        }
    }

    private func wake() {
        var one: UInt8 = 1
        _ = write(wakeWrite, &one, 1)
    }

    /// Loop thread: moves what was posted into `batch` (which should be empty) and says
    /// whether `stop` was called.
    public func take(into batch: inout [Item]) -> Bool {
        shared.withLock { s in
            s.signaled = false
            swap(&batch, &s.queue)
            return s.stopping
        }
    }

    /// Loop thread: empties the wake-up pipe after poll said it is readable.
    public func drainWakeups() {
        var drain = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        while withUnsafeMutableBytes(of: &drain, { read(wakeFd, $0.baseAddress, $0.count) }) == 32 {}
    }

    /// Loop thread, once, at the end: later posts fail with `error`; returns the items still
    /// queued (the caller fails them) after resuming every `stop` waiter.
    public func finish(_ error: FerryError) -> [Item] {
        let (waiters, left): ([@Sendable () -> Void], [Item]) = shared.withLock { s in
            s.finished = error
            defer { s.onStopped = []; s.queue = [] }
            return (s.onStopped, s.queue)
        }
        for w in waiters { w() }
        return left
    }

    /// Loop thread: the loop itself. Each turn issues what was posted, ends once `stop` was
    /// called and `idle()` (nothing in flight), then polls the wake-up pipe and the library's
    /// socket (`socket()` gives its fd and events, nil once the connection is dead) and hands
    /// the socket's events to `service`. A failed poll goes to `failed`. A library that has
    /// timers of its own (libiscsi's timeouts and reconnects) sets `timeout` (milliseconds, -1
    /// for none) and `serviceOnTimeout` so `service` also runs, with no events, when poll
    /// times out.
    public func run(issue: (Item) -> Void, idle: () -> Bool, socket: () -> (fd: Int32, events: Int16)?,
                    timeout: () -> Int32 = { -1 }, serviceOnTimeout: Bool = false,
                    service: (Int16) -> Void, failed: (FerryError) -> Void) {
        var batch: [Item] = []
        var fds = [pollfd](repeating: pollfd(), count: 2)
        while true {
            let stopping = take(into: &batch)
            for item in batch { issue(item) }
            batch.removeAll(keepingCapacity: true)
            if stopping && idle() { return }

            fds[0] = pollfd(fd: wakeFd, events: Int16(POLLIN), revents: 0)
            var count = 1
            if let s = socket() {
                fds[1] = pollfd(fd: s.fd, events: s.events, revents: 0)
                count = 2
            }
            if poll(&fds, nfds_t(count), timeout()) < 0 {
                if errno != EINTR { failed(FerryError.posix(errno, "poll", path: name)) }
                continue
            }
            if fds[0].revents != 0 { drainWakeups() }
            if count == 2 && (fds[1].revents != 0 || serviceOnTimeout) { service(fds[1].revents) }
        }
    }
}
