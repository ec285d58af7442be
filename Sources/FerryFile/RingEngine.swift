#if canImport(Glibc)
import Glibc
#endif
import CFerryLinux
import FerryCore

/// The io_uring engine: one pthread owns the ring and does all submitting and reaping.
///
/// Callers put requests on a locked queue and wake the thread through an eventfd whose read
/// is kept armed in the ring, so the thread sleeps in one place (io_uring_enter) whether it is
/// waiting for I/O or for new work. Each request's SQE carries a retained pointer to its box
/// as user data; a completion either finishes the request (resuming its task) or, after a
/// short transfer, EINTR or EAGAIN, sends it round again for the rest. At most
/// `entries - 1` requests are in the kernel at once (one slot is the wakeup read); the others
/// wait on the queue, so any number of callers can be in flight.
///
/// Blocking calls io_uring has no opcode for (lseek SEEK_DATA/SEEK_HOLE, block-device ioctls)
/// run on a small helper pool, never on the ring thread, which would stall every request.
///
/// `@unchecked Sendable`: the ring and the wakeup buffer are touched by the ring thread only;
/// everything callers share is behind `state`.
final class RingEngine: IOExecutor, @unchecked Sendable {
    private let ring: OpaquePointer
    private let eventFd: Int32
    private let entries: Int
    /// Where the armed eventfd read lands; owned here so it outlives the ring.
    private let wakeBuffer = UnsafeMutablePointer<UInt64>.allocate(capacity: 1)
    private let helpers = ThreadPool(maximum: 2, name: "ferry-helper")

    private struct State {
        var queue: [IORequest] = []
        var head = 0
        /// An eventfd write is on its way: later submitters need not write again.
        var signaled = false
        var stopping = false
        var final: (@Sendable () -> Void)?
        /// Most requests that were in the kernel at once.
        var peakInFlight = 0
    }
    private let state = Locked(State())

    /// Most requests that were in the kernel at once (for tests: never above `entries - 1`).
    var peakInFlight: Int { state.withLock { $0.peakInFlight } }

    /// Sets up a ring of `entries` slots and starts its thread; throws the errno when the
    /// kernel refuses io_uring (seccomp filters, kernel.io_uring_disabled, old kernels).
    init(entries: Int) throws(FerryError) {
        // One slot is the wakeup read, so at least two; 0 goes to the kernel, which refuses it
        // (how the tests reach the fallback).
        let entries = entries == 1 ? 2 : entries
        var error: Int32 = 0
        guard let ring = ferry_ring_create(UInt32(entries), &error) else {
            wakeBuffer.deallocate()
            throw FerryError.posix(-error, "io_uring_queue_init")
        }
        let efd = ferry_eventfd_create()
        guard efd >= 0 else {
            ferry_ring_destroy(ring)
            wakeBuffer.deallocate()
            throw FerryError.posix(-efd, "eventfd")
        }
        self.ring = ring
        self.eventFd = efd
        self.entries = entries
        guard startDetachedThread(name: "ferry-uring", { self.loop() }) else {
            ferry_ring_destroy(ring)
            throw FerryError(.other, "cannot start the io_uring thread")
        }
    }

    deinit {
        // Closed only here: a submitter that queued a request may still be about to write to
        // the eventfd after the ring thread has gone, and holds a reference to self until then.
        _ = ferry_close(eventFd)
        wakeBuffer.deallocate()
    }

    func submit(_ request: IORequest) -> Bool {
        let wake: Bool? = state.withLock { s in
            guard !s.stopping else { return nil }
            s.queue.append(request)
            defer { s.signaled = true }
            return !s.signaled
        }
        guard let wake else { return false }
        if wake { _ = ferry_eventfd_signal(eventFd) }
        return true
    }

    func perform(_ work: @escaping @Sendable () -> Void) -> Bool {
        helpers.enqueue(.work(work))
    }

    func shutdown(then final: @escaping @Sendable () -> Void) {
        let wake: Bool = state.withLock { s in
            precondition(!s.stopping, "engine shut down twice")
            s.stopping = true
            s.final = final
            defer { s.signaled = true }
            return !s.signaled
        }
        if wake { _ = ferry_eventfd_signal(eventFd) }
    }

    // MARK: The ring thread

    private static let wakeTag: UInt64 = 0

    private func loop() {
        let capacity = entries - 1
        var inFlight = 0
        var again: [IORequest] = []
        var batch: [IORequest] = []
        var tags = [UInt64](repeating: 0, count: 64)
        var results = [Int32](repeating: 0, count: 64)
        var wakeArmed = armWakeup()

        while true {
            // Never sleep without a way to be woken.
            if !wakeArmed { wakeArmed = armWakeup() }
            // Requests that came back short go first, then new ones up to the capacity.
            var stopping = false
            state.withLock { s in
                s.signaled = false
                let take = min(capacity - inFlight - again.count, s.queue.count - s.head)
                s.peakInFlight = max(s.peakInFlight, inFlight + again.count + max(take, 0))
                if take > 0 {
                    batch.append(contentsOf: s.queue[s.head ..< s.head + take])
                    s.head += take
                }
                if s.head == s.queue.count {
                    s.queue.removeAll(keepingCapacity: s.queue.count <= 1024)
                    s.head = 0
                }
                stopping = s.stopping && s.head == s.queue.count
            }
            for r in again { prepare(r) }
            for r in batch { prepare(r) }
            inFlight += again.count + batch.count
            again.removeAll(keepingCapacity: true)
            batch.removeAll(keepingCapacity: true)

            if stopping && inFlight == 0 { break }

            let rc = ferry_ring_submit_and_wait(ring, 1)
            if rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY {
                fatalError("io_uring_submit_and_wait failed: \(String(cString: strerror(-rc)))")
            }
            while true {
                let n = Int(ferry_ring_reap(ring, &tags, &results, 64))
                for i in 0 ..< n {
                    if tags[i] == Self.wakeTag {
                        wakeArmed = armWakeup()
                        continue
                    }
                    inFlight -= 1
                    let r = Unmanaged<IORequest>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(tags[i]))!).takeRetainedValue()
                    if let outcome = Self.completion(of: r, result: results[i]) {
                        r.finish(outcome)
                    } else {
                        again.append(r)
                    }
                }
                if n < 64 { break }
            }
        }

        // Take the wakeup read out of the ring before it goes: make it complete and reap it,
        // so the kernel never writes into wakeBuffer after the ring is torn down.
        if wakeArmed {
            _ = ferry_eventfd_signal(eventFd)
            var seen = false
            while !seen {
                _ = ferry_ring_submit_and_wait(ring, 1)
                let n = Int(ferry_ring_reap(ring, &tags, &results, 64))
                for i in 0 ..< n where tags[i] == Self.wakeTag { seen = true }
            }
        }
        ferry_ring_destroy(ring)
        let final = state.withLock { s in
            defer { s.final = nil }
            return s.final
        }
        helpers.shutdown(then: final ?? {})
    }

    /// Queues the read of the eventfd that wakes this thread.
    private func armWakeup() -> Bool {
        ferry_ring_prep_read(ring, eventFd, wakeBuffer, 8, 0, Self.wakeTag) == 0
    }

    /// Queues one SQE for `r`. The ring has room: in-flight requests are capped below its size.
    private func prepare(_ r: IORequest) {
        let tag = UInt64(UInt(bitPattern: Unmanaged.passRetained(r).toOpaque()))
        let rc: Int32
        switch r.operation {
        case .read:
            let t = r.nextTransfer()
            rc = ferry_ring_prep_read(ring, t.fd, t.buffer, UInt32(t.count), t.offset, tag)
        case .write:
            let t = r.nextTransfer()
            rc = ferry_ring_prep_write(ring, t.fd, t.buffer, UInt32(t.count), t.offset, r.rwFlags, tag)
        case .flush:
            rc = ferry_ring_prep_fsync(ring, r.fd, 1, tag)
        case .fallocate(let mode):
            rc = ferry_ring_prep_fallocate(ring, r.fd, mode, r.offset, r.length, tag)
        }
        precondition(rc == 0, "io_uring submission queue full")
    }

    /// What a completion means for its request; nil to submit it again.
    private static func completion(of r: IORequest, result: Int32) -> IOOutcome? {
        switch r.operation {
        case .read, .write:
            return r.advance(by: Int64(result))
        case .flush, .fallocate:
            if result == -EINTR || result == -EAGAIN { return nil }
            return result < 0 ? .failed(errno: -result, offset: r.offset) : .ok
        }
    }
}
