#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// A value behind a pthread mutex, for state shared between Swift tasks and the I/O threads
/// endpoints own.
///
/// A pthread mutex rather than Synchronization.Mutex because ThreadSanitizer understands it
/// (on Linux it reports every Mutex-guarded access as a race), so a TSan run shows only real
/// races. Never held across a blocking call or an `await`.
public final class Locked<Value>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}

/// Starts a detached pthread named `name` (as `ps -L` and /proc show it; at most 15 bytes)
/// that runs `body` once; false if the system has none to give.
///
/// I/O threads and the event loops of network endpoints are plain pthreads: they sit in
/// io_uring_enter, poll(2) and C library calls that must never occupy a thread of Swift's
/// cooperative pool.
public func startDetachedThread(name: String, _ body: @escaping @Sendable () -> Void) -> Bool {
    final class Box {
        let name: String
        let body: @Sendable () -> Void
        init(_ n: String, _ b: @escaping @Sendable () -> Void) { name = n; body = b }
    }
    let context = Unmanaged.passRetained(Box(name, body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        setCurrentThreadName(box.name)
        box.body()
        return nil
    }, context)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(context).release()
        return false
    }
    pthread_detach(thread)
    return true
}

/// Names the calling thread through /proc (Glibc's module does not export
/// pthread_setname_np). Best effort: a failure leaves the inherited name.
func setCurrentThreadName(_ name: String) {
    let fd = open("/proc/thread-self/comm", O_WRONLY)
    guard fd >= 0 else { return }
    let bytes = Array(name.utf8.prefix(15))
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
}

/// CLOCK_MONOTONIC in nanoseconds: for intervals, never for dates.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// A library that a thread of its own may load ahead of first use, once per process: a
/// command that will open an NBD export starts loading libnbd while it parses its arguments.
public final class LibraryPreload: Sendable {
    private let started = Atomic<Bool>(false)
    private let load: @Sendable () -> Void

    /// `load` loads the library if it is not loaded yet (the loaders' own `pthread_once`
    /// makes a first use that comes meanwhile wait for it rather than load it twice).
    public init(_ load: @escaping @Sendable () -> Void) { self.load = load }

    /// Starts loading, the first time only; false when it was started before.
    @discardableResult
    public func start() -> Bool {
        guard !started.exchange(true, ordering: .relaxed) else { return false }
        if !startDetachedThread(name: "ferry-preload", load) { load() }
        return true
    }
}
