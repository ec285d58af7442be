#if canImport(Glibc)
import Glibc
#endif
import CFerryLinux
import FerryCore

/// How a request ended.
enum IOOutcome: Sendable, Equatable {
    case ok
    /// A system call failed with `errno` at `offset`.
    case failed(errno: Int32, offset: Int64)
    /// A read found the end of the file at `offset`, before it had all its bytes.
    case endOfFile(offset: Int64)
    /// The device was closed before the request could start.
    case closed
}

/// One request in flight: the box an engine carries from the caller's task to an I/O thread
/// and back. The only allocation per read or write.
///
/// The calling task fills it in and suspends; from then on only the I/O thread touches it
/// until `finish` resumes the task, which is why it can be `@unchecked Sendable`.
final class IORequest: @unchecked Sendable {
    enum Operation {
        case read, write
        /// fdatasync(2).
        case flush
        /// fallocate(2) with `mode` over `offset ..< offset + length`.
        case fallocate(mode: Int32)
    }

    /// Largest single syscall or SQE; io_uring lengths are 32 bits and Linux moves at most
    /// 0x7ffff000 bytes per call. A power of two, so a multiple of any direct-I/O alignment.
    static let chunkLimit = 1 << 30

    let operation: Operation
    /// The buffered (page cache) descriptor: always usable, at any offset and length.
    let fd: Int32
    /// The O_DIRECT descriptor, or -1. Used for the aligned part of a read or write.
    let directFd: Int32
    /// Offset and length alignment for `directFd`, and buffer address alignment.
    let alignment: Int
    let memoryAlignment: Int
    /// Where the direct descriptor stops being used: the start of the last, partial page of
    /// an image whose size is not a multiple of `alignment`. Bytes from there on go through the
    /// page cache, and no page is ever shared between direct and buffered writes (a dirty page
    /// cache page over direct-written blocks could later be written back over them).
    let directEnd: Int64
    let buffer: UnsafeMutableRawPointer?
    let length: Int64
    let offset: Int64
    /// RWF_DSYNC for writes with forced unit access.
    let rwFlags: Int32
    /// Bytes done so far (short transfers are resumed from here).
    var done: Int64 = 0
    private var continuation: CheckedContinuation<IOOutcome, Never>?

    init(_ operation: Operation, fd: Int32, directFd: Int32 = -1, alignment: Int = 1, memoryAlignment: Int = 1,
         directEnd: Int64 = 0, buffer: UnsafeMutableRawPointer? = nil, length: Int64, offset: Int64, rwFlags: Int32 = 0) {
        self.operation = operation
        self.fd = fd
        self.directFd = directFd
        self.alignment = alignment
        self.memoryAlignment = memoryAlignment
        self.directEnd = directEnd
        self.buffer = buffer
        self.length = length
        self.offset = offset
        self.rwFlags = rwFlags
    }

    /// Hands the request to `submit` and suspends until an I/O thread calls `finish`.
    /// `issued` is called once the request is queued, before the task suspends.
    func run(_ submit: (IORequest) -> Bool, issued: (@Sendable () -> Void)? = nil) async -> IOOutcome {
        await withCheckedContinuation { c in
            continuation = c
            if submit(self) { issued?() } else { finish(.closed) }
        }
    }

    /// Resumes the waiting task. Called exactly once, from any thread.
    func finish(_ outcome: IOOutcome) {
        let c = continuation
        continuation = nil
        c?.resume(returning: outcome)
    }

    /// The next system call of a read or write: the direct descriptor for as many whole
    /// blocks as are aligned (offset and memory) and before `directEnd`, else the buffered one.
    /// That is how the unaligned tail of an O_DIRECT image is served.
    func nextTransfer() -> (fd: Int32, buffer: UnsafeMutableRawPointer, count: Int, offset: Int64) {
        let position = offset + done
        let address = buffer! + Int(done)
        let remaining = length - done
        if directFd >= 0, position % Int64(alignment) == 0, Int(bitPattern: address) % memoryAlignment == 0 {
            let span = min(remaining, directEnd - position)
            let whole = span - span % Int64(alignment)
            if whole > 0 {
                return (directFd, address, Int(min(whole, Int64(Self.chunkLimit))), position)
            }
        }
        return (fd, address, Int(min(remaining, Int64(Self.chunkLimit))), position)
    }

    /// Accounts for one completed read or write system call. Nil: more to do (resubmit).
    func advance(by result: Int64) -> IOOutcome? {
        if result < 0 {
            let err = Int32(-result)
            if err == EINTR || err == EAGAIN { return nil }
            return .failed(errno: err, offset: offset + done)
        }
        if result == 0 {
            // A read at the end of the file; a write that moves nothing will never progress.
            if case .read = operation { return .endOfFile(offset: offset + done) }
            return .failed(errno: EIO, offset: offset + done)
        }
        done += result
        return done >= length ? .ok : nil
    }

    /// Does the whole request with blocking system calls (the thread-pool engine).
    func performBlocking() -> IOOutcome {
        switch operation {
        case .read, .write:
            while true {
                let t = nextTransfer()
                let result: Int64
                if case .read = operation {
                    result = ferry_pread(t.fd, t.buffer, t.count, t.offset)
                } else {
                    result = ferry_pwrite(t.fd, t.buffer, t.count, t.offset, rwFlags)
                }
                if let outcome = advance(by: result) { return outcome }
            }
        case .flush:
            let rc = ferry_fsync(fd, 1)
            return rc < 0 ? .failed(errno: -rc, offset: offset) : .ok
        case .fallocate(let mode):
            let rc = ferry_fallocate(fd, mode, offset, length)
            return rc < 0 ? .failed(errno: -rc, offset: offset) : .ok
        }
    }
}

/// Where a device's requests run: io_uring or a thread pool.
protocol IOExecutor: AnyObject, Sendable {
    /// Queues a read, write, flush or fallocate; false if the engine is shutting down.
    func submit(_ request: IORequest) -> Bool
    /// Runs a blocking call (lseek, ioctl) on an I/O thread; false if shutting down.
    func perform(_ work: @escaping @Sendable () -> Void) -> Bool
    /// Lets accepted work finish, stops the threads, then runs `final` on an I/O thread.
    func shutdown(then final: @escaping @Sendable () -> Void)
}

/// The fallback engine: blocking pread/pwrite on a small pthread pool.
final class ThreadEngine: IOExecutor {
    static let threadCount = 8
    private let pool = ThreadPool(maximum: ThreadEngine.threadCount, name: "ferry-io")

    func submit(_ request: IORequest) -> Bool { pool.enqueue(.request(request)) }
    func perform(_ work: @escaping @Sendable () -> Void) -> Bool { pool.enqueue(.work(work)) }
    func shutdown(then final: @escaping @Sendable () -> Void) { pool.shutdown(then: final) }
}
