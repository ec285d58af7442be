import Synchronization

/// Hands out the write turn in request order: `waitTurn(n)` returns once every request
/// before `n` has called `finish`. Only the worker whose turn comes is woken; the others
/// stay parked on their own continuation.
///
/// Invariant: `next` is the lowest sequence number not yet finished; at most one waiter per
/// sequence number.
public final class Sequencer: Sendable {
    private struct State {
        var next = 0
        var waiters: [Int: CheckedContinuation<Void, any Error>] = [:]
        /// Sequence numbers whose waiting task was cancelled before it parked.
        var cancelled: Set<Int> = []
        /// A turn will never pass (its write failed): every wait throws.
        var failed = false
    }
    private let state = Mutex(State())

    public init() {}

    public func waitTurn(_ seq: Int) async throws {
        if state.withLock({ $0.next == seq && !$0.failed }) { return }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
                enum Now { case go, wait, cancelled }
                let now: Now = state.withLock { s in
                    if s.cancelled.remove(seq) != nil || s.failed { return .cancelled }
                    if s.next == seq { return .go }
                    precondition(s.next < seq, "sequence \(seq) waited after its turn")
                    s.waiters[seq] = c
                    return .wait
                }
                switch now {
                case .go: c.resume()
                case .cancelled: c.resume(throwing: CancellationError())
                case .wait: break
                }
            }
        } onCancel: {
            let c: CheckedContinuation<Void, any Error>? = state.withLock { s in
                if let c = s.waiters.removeValue(forKey: seq) { return c }
                s.cancelled.insert(seq)
                return nil
            }
            c?.resume(throwing: CancellationError())
        }
    }

    /// Ends `seq`'s turn and wakes the worker holding `seq + 1`, if it is waiting.
    public func finish(_ seq: Int) {
        let c: CheckedContinuation<Void, any Error>? = state.withLock { s in
            precondition(s.next == seq, "sequence \(seq) finished out of turn (next is \(s.next))")
            s.next = seq + 1
            return s.waiters.removeValue(forKey: seq + 1)
        }
        c?.resume()
    }

    /// Makes every waiting and later `waitTurn` throw `CancellationError`: for a turn that
    /// will never pass because its write failed.
    public func fail() {
        let waiting: [CheckedContinuation<Void, any Error>] = state.withLock { s in
            s.failed = true
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for c in waiting { c.resume(throwing: CancellationError()) }
    }
}

/// Passes one turn to the next, once, from whichever comes first: the device saying the last
/// write was issued, or the writer finishing.
public final class TurnHandOver: Sendable {
    let sequencer: Sequencer
    let seq: Int
    let passed = Atomic<Bool>(false)

    public init(sequencer: Sequencer, seq: Int) {
        self.sequencer = sequencer
        self.seq = seq
    }

    @Sendable public func pass() {
        if !passed.exchange(true, ordering: .acquiringAndReleasing) { sequencer.finish(seq) }
    }
}
