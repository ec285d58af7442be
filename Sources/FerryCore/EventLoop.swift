import Synchronization

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
///
/// It is also a `TaskExecutor`: a task that prefers it runs on the loop thread between polls,
/// so a request it posts there, and the completion that resumes it, need no thread switch.
/// Jobs that arrive after `finish` run on Swift's global executor.
public final class EventLoopQueue<Item>: TaskExecutor, @unchecked Sendable {
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
        /// Jobs of tasks that prefer this loop as their executor.
        var jobs: [UnownedJob] = []
        /// The loop's thread, once it runs: what it posts or enqueues needs no wake-up.
        var thread: pthread_t?
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
            return (Self.needsWake(&s), nil)
        }
        if outcome.wake { wake() }
        return outcome.failed
    }

    /// Under the lock, after queueing: whether the loop must be woken. Not from its own
    /// thread (it looks at the queue before it polls), nor when a wake-up is on its way.
    private static func needsWake(_ s: inout Shared) -> Bool {
        if let t = s.thread, pthread_equal(t, pthread_self()) != 0 { return false }
        defer { s.signaled = true }
        return !s.signaled
    }

    /// Runs a job of a task that prefers this loop, on the loop thread between polls; after
    /// the loop has ended, on Swift's global executor.
    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        let wake: Bool? = shared.withLock { s in
            if s.finished != nil { return nil }
            s.jobs.append(unowned)
            return Self.needsWake(&s)
        }
        switch wake {
        case nil: globalConcurrentExecutor.enqueue(ExecutorJob(unowned))
        case true?: self.wake()
        case false?: break
        }
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

    /// Gets the loop out of poll for a turn (to look at its clocks again).
    public func nudge() { wake() }

    private func wake() {
        var one: UInt8 = 1
        _ = write(wakeWrite, &one, 1)
    }

    /// Loop thread: moves what was posted into `batch` (which should be empty) and says
    /// whether `stop` was called.
    public func take(into batch: inout [Item], jobs: inout [UnownedJob]) -> Bool {
        shared.withLock { s in
            s.signaled = false
            swap(&batch, &s.queue)
            swap(&jobs, &s.jobs)
            return s.stopping
        }
    }

    /// Loop thread: whether anything was posted or enqueued since the last `take`.
    private func pending() -> Bool {
        shared.withLock { s in !s.queue.isEmpty || !s.jobs.isEmpty }
    }

    /// Loop thread: empties the wake-up pipe after poll said it is readable.
    public func drainWakeups() {
        var drain = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        while withUnsafeMutableBytes(of: &drain, { read(wakeFd, $0.baseAddress, $0.count) }) == 32 {}
    }

    /// Loop thread, once, at the end: later posts fail with `error`; returns the items still
    /// queued (the caller fails them) after resuming every `stop` waiter.
    public func finish(_ error: FerryError) -> [Item] {
        let (waiters, left, jobs): ([@Sendable () -> Void], [Item], [UnownedJob]) = shared.withLock { s in
            s.finished = error
            defer { s.onStopped = []; s.queue = []; s.jobs = [] }
            return (s.onStopped, s.queue, s.jobs)
        }
        for j in jobs { globalConcurrentExecutor.enqueue(ExecutorJob(j)) }
        for w in waiters { w() }
        return left
    }

    /// Loop thread: the loop itself. Each turn issues what was posted, ends once `stop` was
    /// called and `idle()` (nothing in flight), then polls the wake-up pipe and the library's
    /// socket (`socket()` gives its fd and events, nil once the connection is dead) and hands
    /// the socket's events to `service`. A failed poll goes to `failed`. A library that has
    /// timers of its own (libiscsi's timeouts and reconnects) sets `timeout` (milliseconds, -1
    /// for none) and `serviceOnTimeout` so `service` also runs, with no events, when poll
    /// times out. `tick` runs after every poll (the session's request clocks).
    public func run(issue: (Item) -> Void, idle: () -> Bool, socket: () -> (fd: Int32, events: Int16)?,
                    timeout: () -> Int32 = { -1 }, serviceOnTimeout: Bool = false,
                    service: (Int16) -> Void, failed: (FerryError) -> Void, tick: () -> Void = {}) {
        var batch: [Item] = []
        var jobs: [UnownedJob] = []
        var fds = [pollfd](repeating: pollfd(), count: 2)
        shared.withLock { $0.thread = pthread_self() }
        let me = asUnownedTaskExecutor()
        while true {
            let stopping = take(into: &batch, jobs: &jobs)
            for item in batch { issue(item) }
            batch.removeAll(keepingCapacity: true)
            for job in jobs { job.runSynchronously(on: me) }
            jobs.removeAll(keepingCapacity: true)
            // What those jobs posted is issued after a look at the socket, without waiting.
            let more = pending()
            if stopping && idle() && !more { return }

            fds[0] = pollfd(fd: wakeFd, events: Int16(POLLIN), revents: 0)
            var count = 1
            if let s = socket() {
                fds[1] = pollfd(fd: s.fd, events: s.events, revents: 0)
                count = 2
            }
            if poll(&fds, nfds_t(count), more ? 0 : timeout()) < 0 {
                if errno != EINTR { failed(FerryError.posix(errno, "poll", path: name)) }
                continue
            }
            if fds[0].revents != 0 { drainWakeups() }
            if count == 2 && (fds[1].revents != 0 || serviceOnTimeout) { service(fds[1].revents) }
            tick()
        }
    }
}

/// What a C library that is not thread-safe brings to an `EventLoopSession`: its context, how
/// to open it, how to issue one piece through it, and how to poll and service it.
///
/// Every requirement runs on the session's loop thread, which owns the library object and its
/// context from `open` to `close` (except `close` after a failed thread start, which runs on
/// the opening task before any loop exists). The library finishes pieces only through the
/// session: `session.complete` from its completion callbacks (which the library runs inside
/// `service`, on the loop thread), `session.connectionLost` when the connection dies.
public protocol EventLoopLibrary: AnyObject, SendableMetatype {
    associatedtype Piece: SessionPiece
    /// What opening learned (size, limits, capabilities), handed to the opener.
    associatedtype Opened: Sendable

    /// Connects, logs in or mounts, and asks the server what it offers; each step driven to
    /// its end on the loop thread. Throws the `FerryError` the user sees.
    func open(_ session: EventLoopSession<Self>) throws -> Opened

    /// The library's descriptor and the poll events it waits for now.
    func pollFor() -> (fd: Int32, events: Int16)

    /// How long poll may wait, in milliseconds (-1, the default: until the descriptor or a
    /// wake-up). A library with timers of its own gives a timeout and sets
    /// `serviceWithoutEvents`, so `service` also runs, with no events, when poll returns.
    func pollTimeout() -> Int32
    static var serviceWithoutEvents: Bool { get }

    /// Hands poll's events to the library, which reads and writes the socket and runs the
    /// completion callbacks of what finished. Returns an error when the connection is lost.
    func service(_ revents: Int16, _ session: EventLoopSession<Self>) -> FerryError?

    /// Sends one piece (the session has counted it as outstanding). A piece that cannot be
    /// sent is completed with its error through `session.complete` at once.
    func issue(_ piece: Piece, _ session: EventLoopSession<Self>)

    /// Ends the session, once: with `alive` (the connection was not lost), cleanly (a
    /// disconnect, logout or close the server sees); then frees the context, which closes the
    /// socket. After a failed `open` it comes with `alive` true: the library undoes what it
    /// got done. Callbacks the library runs for what it cancels find their pieces already
    /// finished (`session.isOutstanding`).
    func close(alive: Bool)

    /// Opens the connection again after it was lost and `close(alive: false)`d: the same
    /// server, the same file or export, never created or truncated again. The default opens
    /// as `open` did.
    func reopen(_ session: EventLoopSession<Self>) throws
}

extension EventLoopLibrary {
    public func pollTimeout() -> Int32 { -1 }
    public static var serviceWithoutEvents: Bool { false }
    public func reopen(_ session: EventLoopSession<Self>) throws { _ = try open(session) }
}

/// One session of a network endpoint whose C library (`Library`) is driven by a poll loop on
/// a thread of the session's own.
///
/// Threads: the loop thread (a detached pthread, never one of Swift's cooperative pool) owns
/// the library and everything marked "loop thread" here. Callers, from any task, only
/// `submit` pieces (queued under a lock; a wake-up pipe gets the loop out of poll) and `stop`.
/// The loop issues what was queued, polls the wake-up pipe beside the library's descriptor,
/// and calls `service`, inside which the library runs its completion callbacks; they complete
/// pieces, which resume the waiting tasks from the loop thread.
///
/// When a piece may complete: after its `issue`, from a callback of the library on the loop
/// thread; or when the connection is lost (every outstanding piece fails with the loss); or
/// at `submit`, failing at once, when the session is stopping, stopped or lost.
///
/// Stopping: `stop` lets every piece already submitted finish (those queued are still
/// issued), then closes the library cleanly (`close(alive: true)`) unless the connection was
/// lost, fails whatever could still be queued, and returns only then.
///
/// `@unchecked Sendable`: the mutable state is the loop thread's alone (`outstanding`,
/// `dead`, the library), the queue is behind its lock and `load` is atomic.
public final class EventLoopSession<Library: EventLoopLibrary>: PooledSession, @unchecked Sendable {
    public typealias Piece = Library.Piece
    /// The session's number within its device (0 first).
    public let index: Int
    /// The device's name (its URL, as the user may see it), for messages.
    public let name: String
    /// The library: loop thread only, except what its own type says is thread-safe.
    public let library: Library
    private let inbox: EventLoopQueue<Piece>
    private let load = Atomic<Int>(0)

    /// How the session rides out a failing server.
    public let resilience: Resilience
    /// Set (from any thread) once the caller's task was cancelled: requests then get
    /// `Resilience.cancelGrace` to finish before the session is dropped.
    private let cancelled = Atomic<Bool>(false)

    // Loop thread only.
    /// Issued pieces, and when each went out (monotonic nanoseconds).
    private var outstanding: [ObjectIdentifier: (piece: Piece, since: UInt64)] = [:]
    /// Pieces whose connection went away under them, waiting for the reconnect.
    private var parked: [Piece] = []
    /// Times each piece was sent again after an I/O error.
    private var retried: [ObjectIdentifier: Int] = [:]
    /// Reconnect tries left over the session's life (a link that keeps failing ends).
    private lazy var triesLeft = resilience.reconnects * 4
    /// The last time the request clocks were looked at.
    private var lastTick: UInt64 = 0
    /// Set once the connection is lost: what every later piece fails with.
    public private(set) var dead: FerryError?

    private init(index: Int, name: String, library: Library, inbox: EventLoopQueue<Piece>, resilience: Resilience) {
        self.index = index
        self.name = name
        self.library = library
        self.inbox = inbox
        self.resilience = resilience
    }

    /// Starts the loop thread (named `thread`), which opens the library; returns once it is
    /// open, with what it learned. `closed` is what pieces submitted after the end fail with.
    /// On failure the library is closed and the thread has ended.
    public static func start(_ library: Library, index: Int, name: String, thread: String,
                             closed: String, resilience: Resilience = .standard) async throws -> (EventLoopSession, Library.Opened) {
        let inbox: EventLoopQueue<Piece>
        do { inbox = try EventLoopQueue(name: name) } catch { library.close(alive: false); throw error }
        let session = EventLoopSession(index: index, name: name, library: library, inbox: inbox, resilience: resilience)
        let opened: Library.Opened = try await withCheckedThrowingContinuation { continuation in
            let started = startDetachedThread(name: "\(thread)-\(index)") {
                session.run(closed: closed) { continuation.resume(with: $0) }
            }
            if !started {
                let e = FerryError(.other, "cannot start a \(thread) event-loop thread", path: name)
                library.close(alive: false)
                session.finish(e)
                continuation.resume(throwing: e)
            }
        }
        return (session, opened)
    }

    public var busy: Int { load.load(ordering: .relaxed) }

    /// The loop thread as an executor: a task that prefers it runs between polls, and what it
    /// submits here goes out without a wake-up.
    public var executor: any TaskExecutor { inbox }

    public func submit(_ piece: Piece) {
        load.add(1, ordering: .relaxed)
        if let failed = inbox.post(piece) {
            load.subtract(1, ordering: .relaxed)
            piece.call.pieceFinished(failed.at(offset: piece.errorOffset))
        }
    }

    public func stop() async {
        await inbox.stop()
    }

    public func cancelSoon() {
        guard !cancelled.exchange(true, ordering: .relaxed) else { return }
        inbox.nudge()
    }

    // MARK: The loop thread

    /// Loop thread: whether `piece` was issued and has not finished (a late callback's check).
    public func isOutstanding(_ piece: Piece) -> Bool {
        outstanding[ObjectIdentifier(piece)] != nil
    }

    /// Loop thread: `piece` is done (with `error` if it failed). Once per piece; later calls
    /// for the same piece do nothing.
    ///
    /// A piece that failed because its connection went away waits for the reconnect (when
    /// the session may reconnect); one the server failed with an I/O error goes out again, up
    /// to `resilience.retries` times.
    public func complete(_ piece: Piece, error: FerryError?) {
        let id = ObjectIdentifier(piece)
        guard outstanding.removeValue(forKey: id) != nil else { return }
        if let error, dead == nil, !cancelled.load(ordering: .relaxed) {
            if error.isConnectionLoss && resilience.reconnects > 0 {
                parked.append(piece)
                return
            }
            if error.isTransient, retried[id, default: 0] < resilience.retries, inbox.post(piece) == nil {
                retried[id, default: 0] += 1
                Resilience.log.retried()
                return
            }
        }
        finish(piece, error)
    }

    private func finish(_ piece: Piece, _ error: FerryError?) {
        retried.removeValue(forKey: ObjectIdentifier(piece))
        load.subtract(1, ordering: .relaxed)
        piece.call.pieceFinished(error)
    }

    /// Loop thread: the connection is gone. Unless the error is final (a timeout, a
    /// cancellation) the connection is opened again, up to `resilience.reconnects` times,
    /// and every piece in flight goes out again on it. Otherwise every outstanding piece fails
    /// with `error` (at its own offset), and so does every later one; the loop stops polling
    /// the library.
    public func connectionLost(_ error: FerryError) {
        guard dead == nil else { return }
        if resilience.reconnects > 0 && !cancelled.load(ordering: .relaxed) && !error.isFinal {
            reconnect(after: error)
            return
        }
        dead = error
        let pieces = outstanding.values.map(\.piece) + parked
        outstanding = [:]
        parked = []
        for p in pieces { finish(p, error.at(offset: p.errorOffset)) }
    }

    /// Closes the dead connection and opens it again, waiting longer between tries; sends
    /// every piece that was in flight again. When every try fails, the session is dead and
    /// the pieces fail with `error` and the last try's.
    private func reconnect(after error: FerryError) {
        let pieces = outstanding.values.sorted { $0.since < $1.since }.map(\.piece) + parked
        outstanding = [:]
        parked = []
        library.close(alive: false)
        var last = error
        for attempt in 1 ... resilience.reconnects where triesLeft > 0 {
            triesLeft -= 1
            // In slices, so that a cancellation is not kept waiting.
            let until = monotonicNanoseconds() + UInt64(Resilience.backoff(attempt) * 1e9)
            while monotonicNanoseconds() < until && !cancelled.load(ordering: .relaxed) { usleep(20_000) }
            if cancelled.load(ordering: .relaxed) { break }
            do {
                try library.reopen(self)
                Resilience.log.reconnected()
                let now = monotonicNanoseconds()
                for p in pieces {
                    outstanding[ObjectIdentifier(p)] = (p, now)
                    library.issue(p, self)
                }
                return
            } catch {
                last = (error as? FerryError) ?? FerryError(.io, "\(error)", path: name)
                library.close(alive: false)
            }
        }
        var e = error
        e.message += " (reconnecting \(resilience.reconnects) times failed too: \(last.message))"
        dead = e
        for p in pieces { finish(p, e.at(offset: p.errorOffset)) }
    }

    /// Loop thread, after every poll: fails the session when a request has waited longer
    /// than the timeout (or than the grace after a cancellation).
    private func checkClocks() {
        if !parked.isEmpty, dead == nil {
            // Pieces lost their connection but the library did not say it died.
            connectionLost(FerryError(.io, "the connection to the server was lost", path: name, errno: ENOTCONN))
            return
        }
        let cancelling = cancelled.load(ordering: .relaxed)
        let limit = cancelling ? Resilience.cancelGrace : resilience.timeout
        guard limit > 0, dead == nil, !outstanding.isEmpty else { return }
        let now = monotonicNanoseconds()
        // Every 50 ms at most: the scan is over every piece in flight.
        guard now &- lastTick > 50_000_000 else { return }
        lastTick = now
        guard let oldest = outstanding.values.min(by: { $0.since < $1.since }),
              Double(now &- oldest.since) / 1e9 > limit else { return }
        var e: FerryError
        if cancelling {
            e = FerryError(.cancelled, "stopped: the server did not answer in time", path: name)
        } else {
            e = FerryError(.io, "the server did not answer for \(Self.seconds(resilience.timeout)) (--timeout)", path: name, errno: ETIMEDOUT)
        }
        connectionLost(e)
    }

    public static func seconds(_ s: Double) -> String {
        s == s.rounded() ? "\(Int(s)) s" : "\(s) s"
    }

    private func run(closed: String, opened: (Result<Library.Opened, any Error>) -> Void) {
        let info: Library.Opened
        do {
            info = try library.open(self)
        } catch {
            let e = (error as? FerryError) ?? FerryError(.io, "\(error)", path: name)
            library.close(alive: true)
            finish(e)
            opened(.failure(e))
            return
        }
        opened(.success(info))
        inbox.run(
            issue: { issue($0) },
            idle: { outstanding.isEmpty && parked.isEmpty },
            socket: { dead == nil ? library.pollFor() : nil },
            timeout: { dead == nil ? clockTimeout(library.pollTimeout()) : -1 },
            serviceOnTimeout: Library.serviceWithoutEvents,
            service: { revents in
                if let e = library.service(revents, self) { connectionLost(e) }
            },
            failed: { connectionLost($0) },
            tick: { checkClocks() })
        // After a cancellation nothing is in flight, but the server may hang: no clean
        // goodbye is waited for.
        library.close(alive: dead == nil && !cancelled.load(ordering: .relaxed))
        finish(dead ?? FerryError(.other, closed, path: name))
    }

    /// How long poll may wait: the library's wish, or less while requests are timed.
    private func clockTimeout(_ wanted: Int32) -> Int32 {
        let timed = cancelled.load(ordering: .relaxed) || (resilience.timeout > 0 && !outstanding.isEmpty)
        guard timed else { return wanted }
        return wanted < 0 ? 100 : min(wanted, 100)
    }

    private func issue(_ p: Piece) {
        if let dead {
            load.subtract(1, ordering: .relaxed)
            p.call.pieceFinished(dead.at(offset: p.errorOffset))
            return
        }
        outstanding[ObjectIdentifier(p)] = (p, monotonicNanoseconds())
        library.issue(p, self)
    }

    private func finish(_ error: FerryError) {
        for p in inbox.finish(error) {
            retried.removeValue(forKey: ObjectIdentifier(p))
            load.subtract(1, ordering: .relaxed)
            p.call.pieceFinished(error.at(offset: p.errorOffset))
        }
    }
}
