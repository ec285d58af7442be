/// One caller's request that an endpoint carries out as one or more pieces (a request larger
/// than the server's maximum is split): the caller's task resumes once every piece has
/// finished, with the first error any of them met.
///
/// Network endpoints get one per request from `SessionPool.perform`; their sessions call
/// `pieceFinished` from whatever thread completes a piece (an event loop's, a library's).
public final class PendingCall: @unchecked Sendable {
    private struct State {
        var remaining: Int
        var error: FerryError?
        var continuation: CheckedContinuation<Void, any Error>?
    }
    private let state: Locked<State>

    public init(pieces: Int, continuation: CheckedContinuation<Void, any Error>) {
        precondition(pieces > 0, "a call has at least one piece")
        state = Locked(State(remaining: pieces, continuation: continuation))
    }

    /// Called once per piece, from any thread. The last one resumes the caller.
    public func pieceFinished(_ error: FerryError?) {
        let resume: (CheckedContinuation<Void, any Error>, FerryError?)? = state.withLock { s in
            if s.error == nil, let error { s.error = error }
            s.remaining -= 1
            guard s.remaining == 0, let c = s.continuation else { return nil }
            s.continuation = nil
            return (c, s.error)
        }
        guard let (continuation, error) = resume else { return }
        if let error { continuation.resume(throwing: error) } else { continuation.resume() }
    }
}

/// A read-only buffer of zeros shared by every endpoint that zeroes by writing zero bytes.
public final class SharedZeros: @unchecked Sendable {
    /// 1 MiB of zeros, allocated once.
    public static let shared = SharedZeros(count: 1 << 20)
    public let pointer: UnsafeRawPointer
    public let count: Int

    public init(count: Int) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 4096)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: count)
        pointer = UnsafeRawPointer(p)
        self.count = count
    }
}

extension PendingCall {
    /// Sends one request as `pieces` pieces and waits until every one has finished. `send`
    /// gets the call and submits all the pieces that report to it; `issued`, if given, runs
    /// once `send` has returned (every piece queued), before the caller suspends.
    public static func perform(pieces: Int, issued: (@Sendable () -> Void)? = nil,
                               _ send: (PendingCall) -> Void) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            send(PendingCall(pieces: pieces, continuation: continuation))
            issued?()
        }
    }
}
