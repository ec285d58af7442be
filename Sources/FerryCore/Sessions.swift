import Synchronization

// The shape every network endpoint (NBD, NFS, iSCSI; later RBD, HTTP) shares: a device holds a
// `SessionPool` of sessions to one server; each call of the device is cut into pieces by the
// server's limits (`SessionPool.perform`), the pieces go out together, spread over the
// sessions, and the calling task resumes once every piece has finished (`PendingCall`).
//
// What an endpoint keeps for itself: how to open a session, how to issue one piece through its
// library, what the server can do and its limits, and how its library's errors become
// `FerryError`s. A library driven by a poll loop of Ferry's (libnbd, libnfs, libiscsi) plugs
// into `EventLoopSession` (EventLoop.swift); a library that runs its own threads and calls
// back from them (librbd) implements `PooledSession` itself and uses the same pool.

/// One command of a caller's request, as a session carries it.
///
/// A piece is finished exactly once, through `call.pieceFinished`, by the session it was
/// submitted to; until then its caller's task stays suspended, so buffers the piece points
/// into (the caller's) outlive it.
public protocol SessionPiece: AnyObject, Sendable {
    /// The caller's request this piece belongs to.
    var call: PendingCall { get }
    /// Where on the device the piece's work stands now, for the message of an error that is
    /// the session's rather than the command's (a session stopped or lost); nil for none.
    var errorOffset: Int64? { get }
}

/// A session to a server that a `SessionPool` spreads pieces over.
///
/// Contract:
/// - `submit` never blocks and may be called from any thread or task. The session finishes
///   the piece exactly once: on whatever thread the library reports completion (a loop
///   thread of Ferry's, or the library's own), or at once inside `submit` when the session
///   is stopping, stopped or lost.
/// - `busy` counts the pieces submitted and not yet finished: the pool's measure of load.
///   It may be read from any thread and may be stale.
/// - `stop` lets every piece submitted before it finish (complete or fail), closes the
///   session cleanly (a server must not see a session dropped with requests outstanding),
///   and returns only then. Pieces submitted after `stop` began fail at once. Calling it
///   again waits for the same end.
public protocol PooledSession: AnyObject, Sendable {
    associatedtype Piece: SessionPiece
    var busy: Int { get }
    func submit(_ piece: Piece)
    func stop() async
    /// The caller's task was cancelled (Ctrl-C): pieces still waiting a moment from now are
    /// failed rather than waited for, whatever the server does. From any thread.
    func cancelSoon()
}

extension PooledSession {
    public func cancelSoon() {}
}

/// The sessions of one device and how requests are spread over them and split by the
/// server's limits.
///
/// Thread-safe: every method may be called from any task at once. The pool owns its
/// sessions: `stop` stops all of them, once.
public final class SessionPool<Session: PooledSession>: Sendable {
    /// How a piece finds its session.
    public enum Policy: Sendable {
        /// The least busy session, starting the search at a rotating one (ties go round).
        case leastBusy
        /// The first session with fewer than `upTo` pieces, else the least busy: few loops
        /// wake while the load is light, all of them once it is heavy.
        case fillInTurn(upTo: Int)
    }

    public let sessions: [Session]
    private let policy: Policy
    private let next = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)

    public init(_ sessions: [Session], policy: Policy = .leastBusy) {
        precondition(!sessions.isEmpty, "a pool has at least one session")
        self.sessions = sessions
        self.policy = policy
    }

    /// Opens sessions `1 ..< count` all at once beside `first` (already open, checked by the
    /// caller) into a pool. If one fails, every one opened (`first` included) is stopped
    /// and its error thrown.
    public static func open(beside first: Session, count: Int, policy: Policy = .leastBusy,
                            _ open: @escaping @Sendable (Int) async throws -> Session) async throws -> SessionPool {
        let all = try await openSessions(beside: first, count: count, open: open, stop: { await $0.stop() })
        return SessionPool(all, policy: policy)
    }

    public var count: Int { sessions.count }

    /// The session the next piece goes to, by the pool's policy.
    public func pick() -> Session {
        if sessions.count == 1 { return sessions[0] }
        switch policy {
        case .fillInTurn(let upTo):
            var best = sessions[0]
            var bestLoad = Int.max
            for s in sessions {
                let l = s.busy
                if l < upTo { return s }
                if l < bestLoad { best = s; bestLoad = l }
            }
            return best
        case .leastBusy:
            let start = next.wrappingAdd(1, ordering: .relaxed).oldValue
            var best = sessions[start % sessions.count]
            var bestLoad = best.busy
            for k in 1 ..< sessions.count where bestLoad > 0 {
                let s = sessions[(start + k) % sessions.count]
                let l = s.busy
                if l < bestLoad { best = s; bestLoad = l }
            }
            return best
        }
    }

    /// Splits `count` units (bytes or blocks) into pieces of at most `step`, submits them all
    /// at once to the picked sessions and waits until every one has finished; throws the
    /// first error any met. `make` builds the piece at (units done before it, its units).
    /// `issued`, if given, runs once every piece is submitted, before the task suspends (at
    /// once when `count` is 0).
    public func perform(count: Int64, step: Int64, issued: (@Sendable () -> Void)? = nil,
                        _ make: (_ done: Int64, _ units: Int64, PendingCall) -> Session.Piece) async throws {
        guard count > 0 else { issued?(); return }
        precondition(step > 0, "a piece has at least one unit")
        try await withTaskCancellationHandler {
            try await PendingCall.perform(pieces: Int((count + step - 1) / step), issued: issued) { call in
                var done: Int64 = 0
                while done < count {
                    let n = min(step, count - done)
                    pick().submit(make(done, n, call))
                    done += n
                }
            }
        } onCancel: {
            for s in sessions { s.cancelSoon() }
        }
    }

    /// `perform` a batch of at most `batch` pieces at a time, each batch after the one
    /// before has finished: for work with no caller's buffer behind it (zero bytes from one
    /// shared buffer), so a huge range does not queue millions of pieces at once.
    public func performInBatches(count: Int64, step: Int64, batch: Int64 = 64,
                                 _ make: (_ done: Int64, _ units: Int64, PendingCall) -> Session.Piece) async throws {
        var done: Int64 = 0
        while done < count {
            let n = min(step * batch, count - done)
            let base = done
            try await perform(count: n, step: step) { d, k, call in make(base + d, k, call) }
            done += n
        }
    }

    /// One piece to each of `targets` (all sessions by default), waiting for all: for what
    /// a session does for its own share (NFS COMMIT) or what one session does for the
    /// device (a SCSI cache flush, a truncate).
    public func performOnEach(_ targets: [Session]? = nil, _ make: (PendingCall) -> Session.Piece) async throws {
        let to = targets ?? sessions
        try await withTaskCancellationHandler {
            try await PendingCall.perform(pieces: to.count) { call in
                for s in to { s.submit(make(call)) }
            }
        } onCancel: {
            for s in to { s.cancelSoon() }
        }
    }

    /// Stops every session at once (see `PooledSession.stop`); later calls return at once.
    public func stop() async {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        await withTaskGroup(of: Void.self) { group in
            for s in sessions { group.addTask { await s.stop() } }
        }
    }
}

/// Opens sessions `1 ..< count` all at once beside `first` (session 0, already open) and
/// returns all of them in index order. If any fails to open, every one that did (`first`
/// included) is stopped and the first error is thrown.
public func openSessions<Session: Sendable>(
    beside first: Session, count: Int,
    open: @escaping @Sendable (Int) async throws -> Session,
    stop: (Session) async -> Void
) async throws -> [Session] {
    guard count > 1 else { return [first] }
    var opened: [(Int, Session)] = [(0, first)]
    var failure: (any Error)?
    await withTaskGroup(of: (Int, Result<Session, any Error>).self) { group in
        for i in 1 ..< count {
            group.addTask {
                do { return (i, .success(try await open(i))) } catch { return (i, .failure(error)) }
            }
        }
        for await (i, result) in group {
            switch result {
            case .success(let s): opened.append((i, s))
            case .failure(let e): failure = failure ?? e
            }
        }
    }
    if let failure {
        for (_, s) in opened { await stop(s) }
        throw failure
    }
    return opened.sorted { $0.0 < $1.0 }.map(\.1)
}

/// The largest value seen so far, from any thread (test counters: the largest command sent,
/// the most pieces in flight).
public final class HighWaterMark: Sendable {
    private let value = Atomic<Int>(0)

    public init() {}

    public var current: Int { value.load(ordering: .relaxed) }

    public func note(_ n: Int) {
        var seen = value.load(ordering: .relaxed)
        while n > seen {
            let (exchanged, now) = value.compareExchange(expected: seen, desired: n, ordering: .relaxed)
            if exchanged { break }
            seen = now
        }
    }
}

/// A network endpoint's `BlockDevice`: its calls go out as pieces over a `SessionPool` (NBD,
/// NFS, iSCSI) or as a library's own requests (RBD). Its `issued` forms of `write` are the
/// real ones; the plain form hands over to nobody.
public protocol NetworkDevice: HandsOverWrites {
    /// Opened for reading only: write calls throw `.readOnly`.
    var readOnly: Bool { get }
    /// What the device is, in messages: "NBD export", "NFS file", "iSCSI LUN", "RBD image".
    var kind: String { get }
}

extension NetworkDevice {
    /// Throws `.readOnly` for a write call on a device opened read-only.
    public func checkWritable(_ offset: Int64) throws {
        if readOnly { throw FerryError(.readOnly, "the \(kind) was opened read-only", path: name, offset: offset) }
    }

    /// The checks a call that writes `offset ..< offset + length` starts with: in range,
    /// and the device writable.
    public func checkWrite(_ offset: Int64, _ length: Int64) throws {
        try checkRange(offset, length)
        try checkWritable(offset)
    }

    /// `checkWrite` for a write of `buffer`; its bytes, or nil when it has none.
    public func checkWrite(_ offset: Int64, _ buffer: UnsafeRawBufferPointer) throws -> UnsafeRawPointer? {
        try checkWrite(offset, Int64(buffer.count))
        return buffer.count > 0 ? buffer.baseAddress : nil
    }
}

/// A C library's message, or "unknown error" when it has none.
public func libraryMessage(_ text: UnsafePointer<CChar>?) -> String {
    guard let text, text.pointee != 0 else { return "unknown error" }
    return String(cString: text)
}
