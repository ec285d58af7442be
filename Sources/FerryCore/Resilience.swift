import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How a network session rides out a server that fails (`--timeout`, `--retries`,
/// `--reconnects`): qemu-img has none of this; a copy over a flaky link either finishes with
/// exact data or fails saying where.
public struct Resilience: Sendable, Equatable {
    /// Seconds a request may wait for its answer; after that the session fails with a timeout
    /// (a server that stopped answering is not waited for). 0: wait for ever.
    public var timeout: Double
    /// Times a lost connection is opened again, the requests in flight then sent again; 0:
    /// a lost connection fails the copy.
    public var reconnects: Int
    /// Times a request the server failed with an I/O error (EIO) is sent again before the
    /// error stands; 0: at once.
    public var retries: Int

    public init(timeout: Double = 30, reconnects: Int = 5, retries: Int = 3) {
        self.timeout = timeout
        self.reconnects = reconnects
        self.retries = retries
    }

    /// Requests wait 30 s, a lost connection is reopened up to 5 times (over about 6 s), an
    /// I/O error is retried 3 times.
    public static let standard = Resilience()
    /// Nothing retried, nothing timed.
    public static let none = Resilience(timeout: 0, reconnects: 0, retries: 0)

    /// After a cancellation (Ctrl-C) a request may wait this long before its session is
    /// dropped, so that a copy from a server that hangs still ends at once.
    public static let cancelGrace: Double = 0.5

    /// Seconds a clean close (a disconnect, a logout) may wait for the server: a stopped one
    /// is not waited for. At most 2 s, less with a shorter timeout.
    public static func closeLimit(_ timeout: Double) -> Double { timeout > 0 ? min(timeout, 2) : 2 }

    /// Waits before reconnect attempt `n` (1-based): 0.2 s, doubling, at most 3.2 s.
    static func backoff(_ n: Int) -> Double { min(3.2, 0.2 * Double(1 << min(n - 1, 4))) }

    /// What was survived in this process, for the summary and the tests.
    public static let log = ResilienceLog()
}

/// Counts of what sessions survived (process-wide; any thread).
public final class ResilienceLog: Sendable {
    private let reconnectCount = Atomic<Int>(0)
    private let retryCount = Atomic<Int>(0)

    public var reconnects: Int { reconnectCount.load(ordering: .relaxed) }
    public var retries: Int { retryCount.load(ordering: .relaxed) }

    func reconnected() { reconnectCount.add(1, ordering: .relaxed) }
    func retried() { retryCount.add(1, ordering: .relaxed) }
}

extension FerryError {
    /// The connection went away under the request (not the server's answer to it).
    public var isConnectionLoss: Bool {
        guard let e = errno else { return false }
        return e == ENOTCONN || e == ESHUTDOWN || e == ECONNRESET || e == EPIPE || e == ECONNABORTED
    }

    /// A timeout or a cancellation: the session ends, nothing is tried again.
    var isFinal: Bool { code == .cancelled || errno == ETIMEDOUT }

    /// The server answered with an I/O error, which may not happen again.
    public var isTransient: Bool { errno == EIO }
}
