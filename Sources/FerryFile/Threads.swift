#if canImport(Glibc)
import Glibc
#endif
import FerryCore

/// Starts a detached pthread that runs `body` once.
///
/// Ferry's I/O threads are plain pthreads rather than tasks: they sit in blocking system
/// calls (io_uring_enter, pread, fdatasync, ioctl) that must never occupy one of the few
/// threads of Swift's cooperative pool.
func startThread(_ body: @escaping @Sendable () -> Void) {
    final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
    let context = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        box.body()
        return nil
    }, context)
    guard rc == 0 else {
        Unmanaged<Box>.fromOpaque(context).release()
        fatalError("cannot start an I/O thread: \(String(cString: strerror(rc)))")
    }
    pthread_detach(thread)
}

/// Runs a blocking function on a thread of its own and suspends the calling task until it is
/// done. For one-off work before a device has I/O threads (open, create).
func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    let result: Result<T, any Error> = await withCheckedContinuation { continuation in
        startThread { continuation.resume(returning: Result(catching: body)) }
    }
    return try result.get()
}

/// A pthread mutex with one condition variable: what a worker pool needs to sleep until there
/// is work (Synchronization.Mutex has no condition variable).
final class ConditionLock: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(cond, nil)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    /// Call with the lock held.
    func wait() { pthread_cond_wait(cond, mutex) }
    func signal() { pthread_cond_signal(cond) }
    func broadcast() { pthread_cond_broadcast(cond) }
}

/// A small pool of pthreads that run jobs from one locked queue.
///
/// Threads start lazily, one per job waiting with no idle thread, up to `maximum`, so a pool
/// that is never used costs nothing. `shutdown` lets the queued jobs finish, stops the
/// threads, then runs a final job on the last thread (closing file descriptors there keeps
/// close(2), which can block, off the cooperative pool too).
final class ThreadPool: @unchecked Sendable {
    enum Job {
        case request(IORequest)
        case work(@Sendable () -> Void)
    }

    let maximum: Int
    private let lock = ConditionLock()
    // All guarded by `lock`.
    private var jobs: [Job] = []
    private var head = 0
    private var threads = 0
    private var idle = 0
    private var stopping = false
    private var final: (@Sendable () -> Void)?

    init(maximum: Int) {
        precondition(maximum > 0)
        self.maximum = maximum
    }

    /// Queues a job; false if the pool is shutting down (the job will not run).
    @discardableResult
    func enqueue(_ job: Job) -> Bool {
        lock.lock()
        guard !stopping else {
            lock.unlock()
            return false
        }
        jobs.append(job)
        let spawn = idle == 0 && threads < maximum
        if spawn { threads += 1 } else { lock.signal() }
        lock.unlock()
        if spawn { startThread { self.workerLoop() } }
        return true
    }

    /// Finishes the queued jobs, stops every thread, then runs `final` on a pool thread.
    func shutdown(then final: @escaping @Sendable () -> Void) {
        lock.lock()
        precondition(!stopping, "thread pool shut down twice")
        stopping = true
        self.final = final
        let spawn = threads == 0
        if spawn { threads = 1 }
        lock.broadcast()
        lock.unlock()
        if spawn { startThread { self.workerLoop() } }
    }

    private func workerLoop() {
        while true {
            lock.lock()
            while head == jobs.count && !stopping {
                idle += 1
                lock.wait()
                idle -= 1
            }
            if head < jobs.count {
                let job = jobs[head]
                head += 1
                if head == jobs.count || head > 64 && head * 2 > jobs.count {
                    jobs.removeFirst(head)
                    head = 0
                }
                lock.unlock()
                run(job)
                continue
            }
            // Stopping and nothing left: the last thread out runs the final job.
            threads -= 1
            let last = threads == 0 ? final : nil
            if threads == 0 { final = nil }
            lock.unlock()
            last?()
            return
        }
    }

    private func run(_ job: Job) {
        switch job {
        case .work(let body): body()
        case .request(let request): request.finish(request.performBlocking())
        }
    }
}
