#if canImport(Glibc)
import Glibc
#endif
import CFerryLinux
import FerryCore

/// Runs a blocking function on a thread of its own and suspends the calling task until it is
/// done. For one-off work before a device has I/O threads (open, create).
func onOwnThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    let result: Result<T, any Error> = await withCheckedContinuation { continuation in
        let started = startDetachedThread(name: "ferry-open") { continuation.resume(returning: Result(catching: body)) }
        // Out of threads: better to block this one once than to fail the open.
        if !started { continuation.resume(returning: Result(catching: body)) }
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
    /// What the threads are called (`ferry-io`, `ferry-helper`).
    let name: String
    private let lock = ConditionLock()
    // All guarded by `lock`.
    private var jobs: [Job] = []
    private var head = 0
    private var threads = 0
    /// Threads waiting for work that no enqueue has claimed yet.
    private var idle = 0
    /// Wakeups handed to idle threads and not yet taken (guards against spurious wakeups).
    private var wakeups = 0
    private var stopping = false
    private var final: (@Sendable () -> Void)?

    init(maximum: Int, name: String) {
        precondition(maximum > 0)
        self.maximum = maximum
        self.name = name
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
        var spawn = false
        if idle > 0 {
            idle -= 1
            wakeups += 1
            lock.signal()
        } else if threads < maximum {
            threads += 1
            spawn = true
        }
        lock.unlock()
        if spawn { spawnWorker() }
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
        if spawn { spawnWorker() }
    }

    private func spawnWorker() {
        if startDetachedThread(name: name, { self.workerLoop() }) { return }
        lock.lock()
        threads -= 1
        let none = threads == 0
        lock.unlock()
        // With other workers the queue still drains; with none nothing would ever run it.
        if none { fatalError("cannot start an I/O thread: out of threads") }
    }

    private func workerLoop() {
        lock.lock()
        while true {
            if head < jobs.count {
                let job = jobs[head]
                head += 1
                if head == jobs.count || head > 64 && head * 2 > jobs.count {
                    jobs.removeFirst(head)
                    head = 0
                }
                lock.unlock()
                run(job)
                lock.lock()
                continue
            }
            if stopping {
                // Nothing left: the last thread out runs the final job.
                threads -= 1
                let last = threads == 0 ? final : nil
                if threads == 0 { final = nil }
                lock.unlock()
                last?()
                return
            }
            idle += 1
            while wakeups == 0 && !stopping { lock.wait() }
            if wakeups > 0 { wakeups -= 1 } else { idle -= 1 }
        }
    }

    private func run(_ job: Job) {
        switch job {
        case .work(let body): body()
        case .request(let request): request.finish(request.performBlocking())
        }
    }
}
