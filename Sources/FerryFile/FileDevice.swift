#if canImport(Glibc)
import Glibc
#endif
import CFerryLinux
import FerryCore

/// A local regular file or block device as a `BlockDevice`.
///
/// Reads, writes, fdatasync and fallocate go through io_uring, driven by one pthread per
/// device (see `RingEngine`); where the kernel refuses io_uring, or `.threads` is asked for,
/// a small pthread pool does pread/pwrite instead. lseek(SEEK_DATA/SEEK_HOLE) and the block
/// device ioctls run on I/O threads too: no call ever blocks Swift's cooperative pool.
///
/// With `direct`, aligned requests use an O_DIRECT descriptor and the unaligned tail of an
/// image whose size is not a multiple of the block size goes through a second, buffered
/// descriptor on the same file; `flush` syncs both.
///
/// A request is never abandoned half way, not even when its task is cancelled: the kernel may
/// be reading or writing the caller's buffer until the completion arrives.
public final class FileDevice: RangeCopyingDevice, HandsOverWrites {
    /// How I/O is issued.
    public enum IOEngine: String, Sendable {
        /// io_uring if the kernel allows it, else the thread pool. `FERRY_IO=threads` in the
        /// environment forces the thread pool.
        case auto
        /// io_uring, falling back to the thread pool if the kernel refuses it
        /// (`engineInUse` says which).
        case uring
        /// A pool of pthreads doing pread/pwrite.
        case threads
    }

    public struct Options: Sendable {
        public var readOnly: Bool
        /// O_DIRECT (bypass the page cache; requests aligned to the logical block size).
        public var direct: Bool
        /// O_DSYNC.
        public var sync: Bool
        public var engine: IOEngine
        /// Read-only, not `direct`: use O_DIRECT anyway when the file is large and mostly not
        /// in the page cache (see `Opened.shouldReadDirect`). Falls back to the page cache
        /// silently where O_DIRECT is refused.
        public var directIfCold: Bool = false
        /// Buffered writes only (not `direct`, not `sync`): each time this many bytes have
        /// been written, start writing the dirty pages back (sync_file_range(2), on a helper
        /// thread, not waited for). A copy that flushes at the end then finds most of its data
        /// on the disk already, written while it was still reading. 0 leaves write-back to
        /// the kernel.
        public var writeBehind: Int64 = 0
        /// Slots in the io_uring: requests in the kernel at once, plus one (the wakeup read).
        var ringEntries = 128

        public init(readOnly: Bool = false, direct: Bool = false, sync: Bool = false, engine: IOEngine = .auto,
                    directIfCold: Bool = false, writeBehind: Int64 = 0) {
            self.readOnly = readOnly
            self.writeBehind = writeBehind
            self.direct = direct
            self.sync = sync
            self.engine = engine
            self.directIfCold = directIfCold
        }
    }

    /// The ways `writeZeroes` can zero a range, fastest first.
    public enum ZeroMethod: String, Sendable {
        /// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): frees the blocks.
        case punchHole
        /// fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE): zeros, keeps the blocks.
        case zeroRange
        /// ioctl(BLKZEROOUT), block devices only.
        case blockZeroOut
        /// Writing buffers of zeros: what is left when the kernel supports none of the above.
        case writeZeros
    }

    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    /// True for a block device, false for a regular file.
    public let isBlockDevice: Bool

    /// True if another process has the file open for writing as QEMU marks it: a lock on
    /// byte 101 of the file, the "write" permission of its image locking (seen on every
    /// image a running VM or `qemu-io` holds). qemu-img refuses such an image unless `-U`.
    public var heldForWritingElsewhere: Bool { ferry_ofd_lock_held(fd, 101) == 1 }
    /// The engine actually in use (`uring` or `threads`).
    public let engineInUse: IOEngine
    /// Whether aligned requests bypass the page cache (O_DIRECT).
    public let isDirect: Bool
    /// Bytes written between starts of write-back; 0 when write-back is left to the kernel
    /// (see `Options.writeBehind`).
    public let writeBehind: Int64

    /// Buffered descriptor (any offset, any length).
    private let fd: Int32
    /// O_DIRECT descriptor on the same file, or -1.
    private let directFd: Int32
    private let readOnly: Bool
    /// Logical block size: O_DIRECT offsets and lengths, and block-device fallocate/ioctl ranges.
    private let blockSize: Int
    private let memoryAlignment: Int
    /// Where O_DIRECT stops (see `IORequest.directEnd`).
    private let directEnd: Int64
    let executor: any IOExecutor

    private struct State {
        var closed = false
        // What the kernel has not refused yet. Learned once, then remembered.
        var punchHole = true
        var zeroRange = true
        var blockZeroOut = true
        var blockDiscard = true
        /// fallocate/ioctl calls that came back "not supported".
        var refusals = 0
        /// Bytes written since write-back was last started (see `Options.writeBehind`).
        var sinceWriteBack: Int64 = 0
        var startingWriteBack = false
        /// The file system takes RWF_NOWAIT reads (see `readCached`).
        var cachedReads = true
        /// Reads copying from the page cache on their callers' threads right now; `close`
        /// waits for them before the descriptors go.
        var inlineReads = 0
        var closer: CheckedContinuation<Void, Never>?
        var cachedBytes: Int64 = 0
    }
    private let state = Locked(State())

    private init(_ o: Opened, name: String, zeroInit: Bool, options: Options) {
        self.name = name
        // O_DIRECT and O_DSYNC writes leave nothing dirty to start on.
        self.writeBehind = o.readOnly || o.directFd >= 0 || options.sync ? 0 : max(0, options.writeBehind)
        self.size = o.size
        self.isBlockDevice = o.isBlockDevice
        self.fd = o.fd
        self.directFd = o.directFd
        self.readOnly = o.readOnly
        self.blockSize = o.blockSize
        self.memoryAlignment = o.memoryAlignment
        self.isDirect = o.directFd >= 0
        self.executor = o.executor
        self.engineInUse = o.engine
        if o.directFd >= 0 {
            let page = Int64(max(o.blockSize, 4096))
            directEnd = o.size % Int64(o.blockSize) == 0 ? o.size : o.size - o.size % page
        } else {
            directEnd = 0
        }
        let alignment = o.directFd >= 0 ? o.blockSize : 1
        limits = BlockLimits(alignment: alignment, preferredTransfer: 1 << 20, maximumTransfer: 256 << 20)
        var caps: BlockCapabilities = o.isBlockDevice ? [] : [.extents, .cheapZeroReads]
        if !o.readOnly {
            caps.formUnion([.write, .zero, .fastZero, .discard, .flush, .fua, .anyWriteOrder])
            if zeroInit { caps.insert(.zeroInit) }
        }
        capabilities = caps
    }

    deinit {
        let closed = state.withLock { s in
            defer { s.closed = true }
            return s.closed
        }
        if !closed {
            let (fd, directFd) = (self.fd, self.directFd)
            executor.shutdown { Self.closeDescriptors(fd, directFd) }
        }
    }

    // MARK: Opening

    /// Opens an existing file or block device.
    ///
    /// The open(2), fstat(2) and ioctl(BLKGETSIZE64) calls run on a thread of their own.
    public static func open(path: String, options: Options = Options()) async throws -> FileDevice {
        let opened = try await onOwnThread { try Opened.open(path: path, options: options) }
        return FileDevice(opened, name: path, zeroInit: false, options: options)
    }

    /// Creates (or truncates) a regular file of `size` bytes, sparse, reading as zeros
    /// (`.zeroInit`). An existing block device is opened instead, if it is at least `size`
    /// bytes (no `.zeroInit`).
    ///
    /// open(O_CREAT | O_TRUNC) then ftruncate(2), which allocates nothing.
    /// `name` is what messages call the file (the path, unless it is a temporary name).
    public static func create(path: String, size: Int64, options: Options = Options(), name: String? = nil) async throws -> FileDevice {
        guard size >= 0 else { throw FerryError(.invalidArgument, "cannot create: negative size \(size)", path: path) }
        var writable = options
        writable.readOnly = false
        let (opened, created) = try await onOwnThread { [writable] in
            try Opened.create(path: path, size: size, options: writable)
        }
        return FileDevice(opened, name: name ?? path, zeroInit: created, options: writable)
    }

    /// Bytes the file takes on disk (st_blocks x 512); the device size for a block device.
    public static func allocatedSize(path: String) throws -> Int64 {
        var st = ferry_stat()
        let rc = ferry_stat_path(path, &st)
        guard rc == 0 else { throw FerryError.posix(-rc, "could not stat", path: path) }
        guard st.kind == 2 else { return st.blocks512 * 512 }
        let fd = ferry_open(path, O_RDONLY, 0)
        guard fd >= 0 else { throw FerryError.posix(-fd, "could not open", path: path) }
        defer { _ = ferry_close(fd) }
        var bytes: UInt64 = 0
        let r = ferry_blk_size(fd, &bytes)
        guard r == 0 else { throw FerryError.posix(-r, "could not get the size of the block device", path: path) }
        return Int64(bytes)
    }

    // MARK: Reading and writing

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try checkOpen()
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let done = directFd < 0 ? readCached(base, count: buffer.count, at: offset) : 0
        guard done < buffer.count else { return }
        let r = request(.read, buffer: base + done, length: Int64(buffer.count - done), offset: offset + Int64(done))
        try await run(r, "read failed")
    }

    /// Bytes reads took from the page cache on their callers' threads (see `readCached`).
    public var cachedReadBytes: Int64 { state.withLock { $0.cachedBytes } }

    /// Copies what the page cache holds of a read on the caller's thread and returns its
    /// length; the engine reads the rest. Handing a cached read to the ring thread and back
    /// cost more than the copy, and put every copy of a file on that one thread (a warm
    /// `compare` of two 1 GiB raw files took 0.16 s that way, against 0.07 s for a plain
    /// two-thread pread loop). RWF_NOWAIT stops where the disk would have to be waited for.
    private func readCached(_ base: UnsafeMutableRawPointer, count: Int, at offset: Int64) -> Int {
        let go = state.withLock { s in
            guard s.cachedReads, !s.closed else { return false }
            s.inlineReads += 1
            return true
        }
        guard go else { return 0 }
        var done = 0
        var unsupported = false
        while done < count {
            let n = ferry_pread_cached(fd, base + done, count - done, offset + Int64(done))
            if n > 0 {
                done += Int(n)
                continue
            }
            // 0 is the end of the file and an error may be anything: the engine says which.
            unsupported = n == -Int64(EOPNOTSUPP) || n == -Int64(EINVAL)
            break
        }
        let closer = state.withLock { s -> CheckedContinuation<Void, Never>? in
            if unsupported { s.cachedReads = false }
            s.cachedBytes += Int64(done)
            s.inlineReads -= 1
            guard s.inlineReads == 0, let c = s.closer else { return nil }
            s.closer = nil
            return c
        }
        closer?.resume()
        return done
    }

    /// The write is issued once it is in the engine's queue, which submits in order.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        try checkWritable()
        try checkRange(offset, Int64(buffer.count))
        guard let base = buffer.baseAddress, buffer.count > 0 else { issued(); return }
        let r = request(.write, buffer: UnsafeMutableRawPointer(mutating: base), length: Int64(buffer.count),
                        offset: offset, rwFlags: flags.contains(.fua) ? ferry_RWF_DSYNC : 0)
        try await run(r, "write failed", issued: issued)
        if writeBehind > 0 { wrote(Int64(buffer.count)) }
    }

    /// Starts write-back of the whole file once `writeBehind` bytes have been written since
    /// the last start, unless a start is still running (sync_file_range can block while the
    /// disk's queue is full). Its outcome is not needed: `flush` reports any write error.
    private func wrote(_ bytes: Int64) {
        let start = state.withLock { s in
            s.sinceWriteBack += bytes
            guard s.sinceWriteBack >= writeBehind, !s.startingWriteBack else { return false }
            s.sinceWriteBack = 0
            s.startingWriteBack = true
            return true
        }
        guard start else { return }
        let fd = self.fd
        let queued = executor.perform { [self] in
            _ = ferry_sync_file_range_write(fd, 0, 0)
            state.withLock { $0.startingWriteBack = false }
        }
        if !queued { state.withLock { $0.startingWriteBack = false } }
    }

    // MARK: Zeroing and discarding

    /// What `writeZeroes` tries first now, with or without `.mayUnmap`. Starts at the fastest
    /// method and moves down, for good, each time the kernel answers EOPNOTSUPP.
    public func zeroMethod(mayUnmap: Bool) -> ZeroMethod {
        state.withLock { Self.method(in: $0, mayUnmap: mayUnmap, blockDevice: isBlockDevice) }
    }

    /// How many fallocate/ioctl calls the kernel refused as unsupported (each is tried once).
    var zeroRefusals: Int { state.withLock { $0.refusals } }

    /// fallocate(PUNCH_HOLE) with `.mayUnmap`, else fallocate(ZERO_RANGE); BLKZEROOUT on block
    /// devices where fallocate is refused; buffers of zeros last (never with `.fastOnly`).
    /// A range running past the end is clamped to `size`.
    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkWritable()
        guard let (start, count) = clamp(offset, length) else { return }
        // Block devices take fallocate and ioctls in whole logical blocks only; the odd bytes
        // at either end are written.
        var middle = start ..< start + count
        if isBlockDevice {
            let b = Int64(blockSize)
            let lo = (start + b - 1) / b * b
            let hi = (start + count) / b * b
            middle = lo < hi ? lo ..< hi : start ..< start
        }
        if !middle.isEmpty {
            if try await !zeroQuickly(middle, mayUnmap: flags.contains(.mayUnmap)) {
                if flags.contains(.fastOnly) {
                    throw FerryError(.notSupported, "fast zeroing is not supported here", path: name, offset: start)
                }
                try await writeZeroBuffers(middle)
            }
        }
        if middle.isEmpty {
            try await writeZeroBuffers(start ..< start + count)
        } else {
            if start < middle.lowerBound { try await writeZeroBuffers(start ..< middle.lowerBound) }
            if middle.upperBound < start + count { try await writeZeroBuffers(middle.upperBound ..< start + count) }
        }
        if flags.contains(.fua) { try await flush() }
    }

    /// Punches a hole in a file (fallocate), BLKDISCARD on a block device. Silently does
    /// nothing where the kernel does not support it.
    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWritable()
        guard let (start, count) = clamp(offset, length) else { return }
        if isBlockDevice {
            let b = Int64(blockSize)
            let lo = (start + b - 1) / b * b
            let hi = (start + count) / b * b
            guard lo < hi, state.withLock({ $0.blockDiscard }) else { return }
            let fd = self.fd
            let rc = try await blocking { ferry_blk_discard(fd, UInt64(lo), UInt64(hi - lo)) }
            if rc < 0 {
                guard Self.isUnsupported(-rc) else { throw FerryError.posix(-rc, "discard failed", path: name, offset: lo) }
                state.withLock { $0.blockDiscard = false; $0.refusals += 1 }
            }
            return
        }
        guard state.withLock({ $0.punchHole }) else { return }
        let err = try await fallocate(mode: ferry_FALLOC_FL_PUNCH_HOLE | ferry_FALLOC_FL_KEEP_SIZE, start ..< start + count)
        if err != 0 {
            guard Self.isUnsupported(err) else { throw FerryError.posix(err, "discard failed", path: name, offset: start) }
            state.withLock { $0.punchHole = false; $0.refusals += 1 }
        }
    }

    private static func method(in s: State, mayUnmap: Bool, blockDevice: Bool) -> ZeroMethod {
        if mayUnmap && s.punchHole { return .punchHole }
        if s.zeroRange { return .zeroRange }
        if blockDevice && s.blockZeroOut { return .blockZeroOut }
        return .writeZeros
    }

    private static func isUnsupported(_ err: Int32) -> Bool {
        err == EOPNOTSUPP || err == ENOTSUP || err == ENOSYS || err == ENOTTY
    }

    /// Zeros `range` the fastest way the kernel still accepts. False, with nothing touched,
    /// when only writing zeros is left.
    private func zeroQuickly(_ range: Range<Int64>, mayUnmap: Bool) async throws -> Bool {
        // Each pass either succeeds or rules one method out: at most one pass per method.
        for _ in 0 ..< 4 {
            let method = zeroMethod(mayUnmap: mayUnmap)
            let err: Int32
            switch method {
            case .punchHole:
                err = try await fallocate(mode: ferry_FALLOC_FL_PUNCH_HOLE | ferry_FALLOC_FL_KEEP_SIZE, range)
            case .zeroRange:
                err = try await fallocate(mode: ferry_FALLOC_FL_ZERO_RANGE | ferry_FALLOC_FL_KEEP_SIZE, range)
            case .blockZeroOut:
                let fd = self.fd
                err = -(try await blocking { ferry_blk_zeroout(fd, UInt64(range.lowerBound), UInt64(range.count)) })
            case .writeZeros:
                return false
            }
            if err == 0 { return true }
            guard Self.isUnsupported(err) else {
                throw FerryError.posix(err, "could not zero", path: name, offset: range.lowerBound)
            }
            state.withLock { s in
                switch method {
                case .punchHole: s.punchHole = false
                case .zeroRange: s.zeroRange = false
                case .blockZeroOut: s.blockZeroOut = false
                case .writeZeros: break
                }
                s.refusals += 1
            }
        }
        return false
    }

    /// fallocate(2) through the engine; returns 0 or the errno.
    private func fallocate(mode: Int32, _ range: Range<Int64>) async throws -> Int32 {
        try checkOpen()
        let r = IORequest(.fallocate(mode: mode), fd: fd, length: range.upperBound - range.lowerBound, offset: range.lowerBound)
        switch await r.run(executor.submit) {
        case .ok: return 0
        case .failed(let err, _): return err
        case .endOfFile, .closed: throw closedError
        }
    }

    /// 1 MiB of zeros, page aligned so O_DIRECT can write it as it is.
    private static let zeros: AlignedBuffer = {
        let b = AlignedBuffer(count: 1 << 20)
        b.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        return b
    }()

    /// Writes zero bytes over `range` in 1 MiB pieces, four at a time. Pieces end on 1 MiB
    /// boundaries, so after the first every piece is aligned for O_DIRECT.
    private func writeZeroBuffers(_ range: Range<Int64>) async throws {
        let chunk = Int64(Self.zeros.count)
        try await withThrowingTaskGroup(of: Void.self) { group in
            var position = range.lowerBound
            var running = 0
            while position < range.upperBound {
                if running == 4 {
                    try await group.next()
                    running -= 1
                }
                let at = position
                let n = min(range.upperBound - position, chunk - position % chunk)
                group.addTask {
                    try self.checkOpen()
                    let r = self.request(.write, buffer: Self.zeros.base, length: n, offset: at)
                    try await self.run(r, "write failed")
                }
                running += 1
                position += n
            }
            try await group.waitForAll()
        }
    }

    // MARK: Extents

    /// Most extents one call returns; the caller asks again from where the answer stopped.
    static let extentBatch = 1024

    /// lseek(SEEK_DATA) and lseek(SEEK_HOLE) on a regular file: holes are `.zero`, the rest
    /// `.data`. A block device answers one `.data` extent. A range running past the end is
    /// clamped to `size`.
    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, 0)
        try checkOpen()
        guard capabilities.contains(.extents), range.lowerBound < size else {
            return [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
        }
        let (fd, size) = (self.fd, self.size)
        let result = try await blocking { Self.mapExtents(fd: fd, from: range.lowerBound, to: range.upperBound, size: size) }
        switch result {
        case .success(let extents): return extents
        case .failure(let failure):
            throw FerryError.posix(failure.errno, "could not map extents", path: name, offset: failure.offset)
        }
    }

    struct MapFailure: Error { var errno: Int32; var offset: Int64 }

    /// The SEEK_DATA/SEEK_HOLE walk, on an I/O thread.
    static func mapExtents(fd: Int32, from start: Int64, to end: Int64, size: Int64) -> Result<[Extent], MapFailure> {
        mapExtents(fd: fd, from: start, to: end, size: size,
                   seekData: { ferry_seek_data(fd, $0) }, seekHole: { ferry_seek_hole(fd, $0) })
    }

    /// The walk itself; the seeks are parameters so that a test can count them.
    static func mapExtents(fd: Int32, from start: Int64, to end: Int64, size: Int64,
                           seekData: (Int64) -> Int64, seekHole: (Int64) -> Int64) -> Result<[Extent], MapFailure> {
        var out: [Extent] = []
        var position = start
        while position < size && position < end && out.count < extentBatch {
            let data = seekData(position)
            if data < 0 {
                let err = Int32(-data)
                if err == ENXIO {
                    // No data from here to the end of the file, unless the file has shrunk
                    // since it was opened: what lies past its new end must be read (and fail
                    // with a short read) rather than pass for zeros.
                    var st = stat()
                    let actual = fstat(fd, &st) == 0 ? Int64(st.st_size) : size
                    if actual < size {
                        if position < actual { out.append(Extent(offset: position, length: actual - position, kind: .zero)) }
                        let from = max(position, actual)
                        out.append(Extent(offset: from, length: size - from, kind: .data))
                    } else {
                        out.append(Extent(offset: position, length: size - position, kind: .zero))
                    }
                    break
                }
                if err == EINVAL || isUnsupported(err) {
                    // The file system cannot tell: everything is data.
                    out.append(Extent(offset: position, length: size - position, kind: .data))
                    break
                }
                return .failure(MapFailure(errno: err, offset: position))
            }
            if data > position {
                let holeEnd = min(data, size)
                out.append(Extent(offset: position, length: holeEnd - position, kind: .zero))
                position = holeEnd
                // Data starts here, so ask straight for its end (one lseek fewer per extent).
                guard position < size, position < end, out.count < extentBatch else { break }
            }
            let hole = seekHole(position)
            if hole < 0 { return .failure(MapFailure(errno: Int32(-hole), offset: position)) }
            // A file shrunk under us reports its own end; past that it reads short anyway.
            let dataEnd = hole > position ? min(hole, size) : size
            out.append(Extent(offset: position, length: dataEnd - position, kind: .data))
            position = dataEnd
        }
        return .success(out)
    }

    // MARK: Flush and close

    /// fdatasync(2) on each descriptor, through the engine.
    public func flush() async throws {
        try checkOpen()
        guard !readOnly else { return }
        for descriptor in [fd, directFd] where descriptor >= 0 {
            let r = IORequest(.flush, fd: descriptor, length: 0, offset: 0)
            switch await r.run(executor.submit) {
            case .ok: break
            case .failed(let err, _): throw FerryError.posix(err, "flush failed", path: name)
            case .endOfFile, .closed: throw closedError
            }
        }
    }

    /// Stops the I/O threads once the requests already accepted are done, then closes the
    /// descriptors on an I/O thread. A second call does nothing; any other call after it
    /// throws.
    public func close() async throws {
        let first = state.withLock { s in
            defer { s.closed = true }
            return !s.closed
        }
        guard first else { return }
        await withCheckedContinuation { c in
            let now = state.withLock { s in
                guard s.inlineReads > 0 else { return true }
                s.closer = c
                return false
            }
            if now { c.resume() }
        }
        let (fd, directFd) = (self.fd, self.directFd)
        let err: Int32 = await withCheckedContinuation { c in
            executor.shutdown { c.resume(returning: Self.closeDescriptors(fd, directFd)) }
        }
        if err != 0 { throw FerryError.posix(err, "close failed", path: name) }
    }

    @discardableResult
    private static func closeDescriptors(_ fd: Int32, _ directFd: Int32) -> Int32 {
        var err: Int32 = 0
        if directFd >= 0 { let rc = ferry_close(directFd); if rc < 0 { err = -rc } }
        let rc = ferry_close(fd)
        if rc < 0 && err == 0 { err = -rc }
        return err
    }

    // MARK: Helpers

    private var closedError: FerryError { FerryError(.invalidArgument, "the device is closed", path: name) }

    private func checkOpen() throws {
        if state.withLock({ $0.closed }) { throw closedError }
    }

    private func checkWritable() throws {
        try checkOpen()
        if readOnly { throw FerryError(.readOnly, "cannot write: the image is open read-only", path: name) }
    }

    /// Clamps a zero or discard range to the device; nil if nothing is left.
    private func clamp(_ offset: Int64, _ length: Int64) -> (Int64, Int64)? {
        guard offset >= 0, length > 0, offset < size else { return nil }
        return (offset, min(length, size - offset))
    }

    private func request(_ op: IORequest.Operation, buffer: UnsafeMutableRawPointer, length: Int64, offset: Int64,
                         rwFlags: Int32 = 0) -> IORequest {
        IORequest(op, fd: fd, directFd: directFd, alignment: blockSize, memoryAlignment: memoryAlignment,
                  directEnd: directEnd, buffer: buffer, length: length, offset: offset, rwFlags: rwFlags)
    }

    /// Sends a read or write to the engine and turns its outcome into a `FerryError`.
    private func run(_ r: IORequest, _ what: String, issued: (@Sendable () -> Void)? = nil) async throws {
        switch await r.run(executor.submit, issued: issued) {
        case .ok:
            return
        case .failed(let err, let offset):
            throw FerryError.posix(err, what, path: name, offset: offset)
        case .endOfFile(let offset):
            throw FerryError(.shortRead, "unexpected end of file: the image is shorter than its size \(size)",
                             path: name, offset: offset)
        case .closed:
            throw closedError
        }
    }

    /// Runs a blocking call on an I/O thread and suspends until it is done.
    /// Data between two descriptors in the page cache, by `copy_file_range(2)`. Not into a
    /// target written with O_DIRECT (its cache would go stale behind the copy).
    public func copyRange(at offset: Int64, length: Int64, to target: any BlockDevice, at targetOffset: Int64) async throws -> Bool {
        try checkOpen()
        guard let t = target as? FileDevice, !t.readOnly, !t.isDirect else { return false }
        guard let (start, count) = clamp(offset, length), count == length else {
            throw FerryError(.invalidArgument, "copy of \(length) bytes at offset \(offset) runs past the end (\(size) bytes)", path: name, offset: offset)
        }
        let (src, dst) = (fd, t.fd)
        let rc = try await blocking { ferry_copy_file_range(src, start, dst, targetOffset, count) }
        if rc < 0 {
            if Self.isUnsupported(-rc) || -rc == EXDEV || -rc == EINVAL { return false }
            throw FerryError.posix(-rc, "copy offload (copy_file_range) to \(t.name) failed", path: name, offset: start)
        }
        return true
    }

    private func blocking<T: Sendable>(_ body: @escaping @Sendable () -> T) async throws -> T {
        let result: T? = await withCheckedContinuation { c in
            if !executor.perform({ c.resume(returning: body()) }) { c.resume(returning: nil) }
        }
        guard let result else { throw closedError }
        return result
    }
}
