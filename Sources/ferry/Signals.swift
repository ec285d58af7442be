#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import Synchronization

/// Turns SIGINT and SIGTERM into cancellation of one task, for as long as `body` runs.
///
/// The first signal cancels the task; the copy engine then stops, removes a target it created,
/// and throws `.cancelled` saying where it stopped. A second signal gives up waiting and exits
/// at once with the signal's status. Outside `body` the signals have their default effect.
enum SignalCancellation {
    /// The signal that stopped the last `run`, if any.
    private static let received = Mutex<Int32>(0)

    static var receivedSignal: Int32? {
        let s = received.withLock { $0 }
        return s == 0 ? nil : s
    }

    /// Cancels the task `run` is running (nil outside `run`).
    private static let cancelRunning = Mutex<(@Sendable () -> Void)?>(nil)

    /// Stops the running task as SIGPIPE would stop a program that writes to a closed pipe,
    /// but cleanly: the reader of stdout (or of the progress descriptor) went away. SIGPIPE
    /// itself is ignored (`main`): a server's socket closing must not stop a copy that can
    /// reconnect.
    ///
    /// With nothing running (`info`, `map`, `measure` printing their answer), a closed stdout
    /// ends the process at once with SIGPIPE's status, 141, as it ended qemu-img: the reader
    /// did not get the whole answer, so the command must not say it succeeded.
    static func outputClosed(fd: Int32) {
        enum Next { case cancel(@Sendable () -> Void), exit, nothing }
        let next: Next = received.withLock { r in
            guard r == 0 else { return .nothing }
            guard let cancel = cancelRunning.withLock({ $0 }) else { return fd == STDOUT_FILENO ? .exit : .nothing }
            r = SIGPIPE
            return .cancel(cancel)
        }
        switch next {
        case .cancel(let cancel):
            Terminal.complain("the output was closed (broken pipe); stopping")
            cancel()
        case .exit:
            exit(128 + SIGPIPE)
        case .nothing:
            break
        }
    }

    /// Runs `operation` in a task that SIGINT / SIGTERM cancel; SIGUSR1 calls `onUSR1`
    /// meanwhile (when given).
    static func run<T: Sendable>(onUSR1: (@Sendable () -> Void)? = nil,
                                 _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
        let task = Task { try await operation() }
        cancelRunning.withLock { $0 = { task.cancel() } }
        let queue = DispatchQueue(label: "ferry.signals")
        var sources: [any DispatchSourceSignal] = []
        if let onUSR1 {
            signal(SIGUSR1, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: SIGUSR1, queue: queue)
            source.setEventHandler { onUSR1() }
            source.resume()
            sources.append(source)
        }
        for sig in [SIGINT, SIGTERM] {
            // The dispatch source sees the signal only while its default action is off.
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: queue)
            source.setEventHandler {
                let first = received.withLock { r -> Bool in
                    defer { if r == 0 { r = sig } }
                    return r == 0
                }
                if first {
                    task.cancel()
                } else {
                    Terminal.complain("interrupted again; exiting without cleaning up")
                    _exit(128 + sig)
                }
            }
            source.resume()
            sources.append(source)
        }
        defer {
            cancelRunning.withLock { $0 = nil }
            for s in sources { s.cancel() }
            signal(SIGINT, SIG_DFL)
            signal(SIGTERM, SIG_DFL)
            // Ignored, not default (which kills): a signal sent just after the copy must not.
            if onUSR1 != nil { signal(SIGUSR1, SIG_IGN) }
        }
        return try await task.value
    }
}
