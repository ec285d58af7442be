import XCTest
import Synchronization
@testable import FerryCore

#if canImport(Glibc)
import Glibc
#endif

/// A piece of the fakes below: a range of units and the call it belongs to.
final class FakePiece: SessionPiece, @unchecked Sendable {
    let call: PendingCall
    let start: Int64
    let units: Int64
    /// Set once by the session that got it (the loop thread, or the fake's own thread).
    var session = -1
    var errorOffset: Int64? { start }

    init(_ start: Int64, _ units: Int64, _ call: PendingCall) {
        self.start = start
        self.units = units
        self.call = call
    }
}

/// A session shaped like librbd's: no event loop of Ferry's; every piece completes on a
/// thread of the session's own after `delay`, failing when it covers `failAt`.
final class ThreadedSession: PooledSession, @unchecked Sendable {
    let index: Int
    let delay: useconds_t
    let failAt: Int64?
    private let load = Atomic<Int>(0)
    private let log = Locked<[FakePiece]>([])
    let stops = Atomic<Int>(0)

    init(_ index: Int, delay: useconds_t = 2000, failAt: Int64? = nil) {
        self.index = index
        self.delay = delay
        self.failAt = failAt
    }

    var busy: Int { load.load(ordering: .relaxed) }
    var pieces: [FakePiece] { log.withLock { $0 } }

    func submit(_ piece: FakePiece) {
        load.add(1, ordering: .relaxed)
        piece.session = index
        log.withLock { $0.append(piece) }
        let delay = self.delay
        let failing = failAt.map { piece.start <= $0 && $0 < piece.start + piece.units } ?? false
        _ = startDetachedThread(name: "fake-\(index)") { [self] in
            usleep(delay)
            load.subtract(1, ordering: .relaxed)
            piece.call.pieceFinished(failing ? FerryError(.io, "fake failure", path: "fake", offset: piece.start) : nil)
        }
    }

    func stop() async { stops.add(1, ordering: .relaxed) }
}

final class SessionPoolTests: XCTestCase {
    func testARequestIsSplitByTheStepAndSpreadOverTheSessions() async throws {
        let sessions = (0 ..< 3).map { ThreadedSession($0) }
        let pool = SessionPool(sessions)
        try await pool.perform(count: 10_500, step: 1000) { done, n, call in FakePiece(done, n, call) }
        let all = sessions.flatMap(\.pieces).sorted { $0.start < $1.start }
        XCTAssertEqual(all.count, 11)
        var cursor: Int64 = 0
        for p in all {
            XCTAssertEqual(p.start, cursor)
            XCTAssertLessThanOrEqual(p.units, 1000)
            cursor += p.units
        }
        XCTAssertEqual(cursor, 10_500)
        // Each piece is still in flight when the next is picked: the least busy is another.
        XCTAssertEqual(Set(all.map(\.session)), [0, 1, 2])
        XCTAssertTrue(sessions.allSatisfy { $0.busy == 0 })
    }

    func testFillInTurnKeepsALightLoadOnTheFirstSession() async throws {
        // Slow pieces: none finishes while the 40 are handed out.
        let sessions = (0 ..< 3).map { ThreadedSession($0, delay: 300_000) }
        let pool = SessionPool(sessions, policy: .fillInTurn(upTo: 16))
        try await pool.perform(count: 8, step: 1) { done, n, call in FakePiece(done, n, call) }
        XCTAssertEqual(sessions[0].pieces.count, 8)
        try await pool.perform(count: 40, step: 1) { done, n, call in FakePiece(done, n, call) }
        XCTAssertEqual(sessions[0].pieces.count, 8 + 16, "the first fills to 16, then the next one takes over")
        XCTAssertGreaterThan(sessions[1].pieces.count, 0)
    }

    func testTheFirstErrorComesOnlyOnceEveryPieceHasFinished() async throws {
        let sessions = [ThreadedSession(0, delay: 20_000, failAt: 2500), ThreadedSession(1, delay: 1000, failAt: 2500)]
        let pool = SessionPool(sessions)
        do {
            try await pool.perform(count: 8000, step: 1000) { done, n, call in FakePiece(done, n, call) }
            XCTFail("a failed piece fails the call")
        } catch let e as FerryError {
            XCTAssertEqual(e.offset, 2000)
            XCTAssertTrue(e.message.contains("fake failure"), e.message)
        }
        // Whichever session failed, the other's pieces were still running.
        XCTAssertTrue(sessions.allSatisfy { $0.busy == 0 }, "the caller resumed before every piece had finished")
    }

    func testBatchesBoundThePiecesInFlight() async throws {
        let sessions = (0 ..< 2).map { ThreadedSession($0, delay: 200) }
        let pool = SessionPool(sessions)
        let most = HighWaterMark()
        try await pool.performInBatches(count: 1000, step: 3, batch: 16) { done, n, call in
            most.note(sessions.reduce(0) { $0 + $1.busy } + 1)
            return FakePiece(done, n, call)
        }
        let all = sessions.flatMap(\.pieces)
        XCTAssertEqual(all.reduce(0) { $0 + $1.units }, 1000)
        XCTAssertEqual(Set(all.map(\.start)).count, all.count)
        XCTAssertLessThanOrEqual(most.current, 16)
    }

    func testOneToEachAndStopOnce() async throws {
        let sessions = (0 ..< 3).map { ThreadedSession($0) }
        let pool = SessionPool(sessions)
        try await pool.performOnEach { FakePiece(0, 0, $0) }
        XCTAssertEqual(sessions.map(\.pieces.count), [1, 1, 1])
        try await pool.performOnEach([sessions[2]]) { FakePiece(0, 0, $0) }
        XCTAssertEqual(sessions.map(\.pieces.count), [1, 1, 2])
        await pool.stop()
        await pool.stop()
        XCTAssertEqual(sessions.map { $0.stops.load(ordering: .relaxed) }, [1, 1, 1])
    }
}

/// A library for `EventLoopSession` whose "server" is a pipe: issuing a piece writes one byte,
/// and the loop completes one piece (oldest first) per byte it reads back.
final class PipeLibrary: EventLoopLibrary {
    let fds: (read: Int32, write: Int32)
    let failOpen: Bool
    private var sent: [FakePiece] = []
    let loopThreadName = Locked<String?>(nil)
    let closes = Locked<[Bool]>([])
    /// Bytes are written only once this is set: pieces stay in flight until then.
    let released = Atomic<Bool>(true)

    init(failOpen: Bool = false) {
        var p: [Int32] = [-1, -1]
        _ = pipe(&p)
        _ = fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK)
        fds = (p[0], p[1])
        self.failOpen = failOpen
    }

    deinit { Glibc.close(fds.read); Glibc.close(fds.write) }

    func open(_ session: EventLoopSession<PipeLibrary>) throws -> Int {
        let name = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "?"
        loopThreadName.withLock { $0 = name.trimmingCharacters(in: .whitespacesAndNewlines) }
        if failOpen { throw FerryError(.notFound, "no such fake server", path: session.name) }
        return 42
    }

    func pollFor() -> (fd: Int32, events: Int16) { (fds.read, Int16(POLLIN)) }

    func service(_ revents: Int16, _ session: EventLoopSession<PipeLibrary>) -> FerryError? {
        var byte: UInt8 = 0
        while read(fds.read, &byte, 1) == 1, !sent.isEmpty {
            session.complete(sent.removeFirst(), error: nil)
        }
        return nil
    }

    func issue(_ piece: FakePiece, _ session: EventLoopSession<PipeLibrary>) {
        sent.append(piece)
        if released.load(ordering: .relaxed) { answer() }
    }

    /// The "server" answers one piece (from any thread).
    func answer() {
        var one: UInt8 = 1
        _ = write(fds.write, &one, 1)
    }

    func close(alive: Bool) { closes.withLock { $0.append(alive) } }
}

final class EventLoopSessionTests: XCTestCase {
    func testPiecesCompleteOnTheLoopThreadAndStopClosesOnce() async throws {
        let library = PipeLibrary()
        let (session, opened) = try await EventLoopSession.start(library, index: 3, name: "fake://x", thread: "ferry-fake",
                                                                 closed: "the fake session is closed")
        XCTAssertEqual(opened, 42)
        XCTAssertEqual(library.loopThreadName.withLock { $0 }, "ferry-fake-3")
        let pool = SessionPool([session])
        try await pool.perform(count: 100, step: 7) { done, n, call in FakePiece(done, n, call) }
        XCTAssertEqual(session.busy, 0)
        await pool.stop()
        XCTAssertEqual(library.closes.withLock { $0 }, [true], "closed once, cleanly")
        do {
            try await pool.perform(count: 1, step: 1) { done, n, call in FakePiece(done, n, call) }
            XCTFail("a stopped session fails what comes after")
        } catch let e as FerryError {
            XCTAssertTrue(e.message.contains("closed"), e.message)
            XCTAssertEqual(e.path, "fake://x")
        }
    }

    func testStopWaitsForThePiecesInFlight() async throws {
        let library = PipeLibrary()
        library.released.store(false, ordering: .relaxed)
        let (session, _) = try await EventLoopSession.start(library, index: 0, name: "fake://y", thread: "ferry-fake",
                                                            closed: "closed")
        let finished = Locked(0)
        let call = Task {
            try await SessionPool([session]).perform(count: 5, step: 1) { done, n, call in FakePiece(done, n, call) }
            finished.withLock { $0 += 1 }
        }
        while session.busy < 5 { await Task.yield() }
        let stopped = Task { await session.stop() }
        try await Task.sleep(nanoseconds: 50_000_000)
        XCTAssertEqual(finished.withLock { $0 }, 0)
        XCTAssertEqual(library.closes.withLock { $0 }, [], "not closed while pieces are in flight")
        for _ in 0 ..< 5 { library.answer() }
        try await call.value
        await stopped.value
        XCTAssertEqual(finished.withLock { $0 }, 1)
        XCTAssertEqual(library.closes.withLock { $0 }, [true])
    }

    func testAFailedOpenThrowsAndCloses() async throws {
        let library = PipeLibrary(failOpen: true)
        do {
            _ = try await EventLoopSession.start(library, index: 0, name: "fake://z", thread: "ferry-fake", closed: "closed")
            XCTFail("open failed")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .notFound)
        }
        XCTAssertEqual(library.closes.withLock { $0 }.count, 1)
    }

    /// A task that prefers the session's loop as its executor runs on the loop thread, and
    /// what it submits there goes out without a wake-up byte: the loop looks at its queue
    /// before it polls. Without that look, this poll waited for ever (the fake server's pipe
    /// and the wake-up pipe both quiet).
    func testATaskPreferringTheLoopRunsThereAndItsPiecesGoOut() async throws {
        let library = PipeLibrary()
        let (session, _) = try await EventLoopSession.start(library, index: 1, name: "fake://e", thread: "ferry-fake",
                                                            closed: "closed")
        let threads = try await within(seconds: 10) {
            try await withTaskExecutorPreference(session.executor) {
                var seen = [threadName()]
                for round in 0 ..< 20 {
                    try await SessionPool([session]).perform(count: 3, step: 1) { done, n, call in FakePiece(done + Int64(3 * round), n, call) }
                    seen.append(threadName())
                }
                return seen
            }
        }
        XCTAssertEqual(Set(threads ?? []), ["ferry-fake-1"], "resumed off the loop")
        XCTAssertEqual(session.busy, 0)
        await session.stop()
        // Once the loop has ended, a task that still prefers it runs on Swift's own threads.
        let after = try await within(seconds: 10) {
            await withTaskExecutorPreference(session.executor) {
                await Task.yield()
                return threadName()
            }
        }
        XCTAssertNotNil(after, "a job for a finished loop was never run")
        XCTAssertNotEqual(after, "ferry-fake-1")
    }
}

/// The calling thread's name.
private func threadName() -> String {
    ((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "?")
        .trimmingCharacters(in: .whitespacesAndNewlines)
}

/// `body`'s result, or nil (after a test failure) when it has not finished in `seconds`: the
/// task is left behind rather than waited for, so a hang fails the test instead of the run.
private func within<T: Sendable>(seconds: Double, _ body: @escaping @Sendable () async throws -> T) async throws -> T? {
    let result = Locked<Result<T, any Error>?>(nil)
    Task {
        let r: Result<T, any Error>
        do { r = .success(try await body()) } catch { r = .failure(error) }
        result.withLock { $0 = r }
    }
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if let r = result.withLock({ $0 }) { return try r.get() }
        try await Task.sleep(nanoseconds: 5_000_000)
    }
    XCTFail("did not finish in \(seconds) s")
    return nil
}
