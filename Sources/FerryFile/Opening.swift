#if canImport(Glibc)
import Glibc
#endif
import CFerryLinux
import FerryCore

/// What opening a file or block device found out, handed from the opening thread to `FileDevice`.
struct Opened: Sendable {
    var fd: Int32
    var directFd: Int32 = -1
    var size: Int64
    var isBlockDevice: Bool
    var readOnly: Bool
    /// Logical block size (block devices) or O_DIRECT offset alignment (files); 512 if unknown.
    var blockSize: Int = 512
    var memoryAlignment: Int = 512
    var executor: any IOExecutor
    var engine: FileDevice.IOEngine

    /// open(2) an existing file or block device. Runs on a thread of its own.
    static func open(path: String, options: FileDevice.Options) throws -> Opened {
        var flags = options.readOnly ? O_RDONLY : O_RDWR
        if options.sync { flags |= ferry_O_DSYNC }
        let fd = ferry_open(path, flags, 0)
        guard fd >= 0 else {
            if -fd == EISDIR { throw isDirectory(path) }
            throw FerryError.posix(-fd, "could not open", path: path)
        }
        // A source is read front to back, several requests at once: without the hint the
        // kernel's readahead loses track of it (a cold 512 MiB copy took 0.5-0.7 s, with it 0.4 s).
        if options.readOnly { _ = posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL) }
        return try finish(fd: fd, path: path, flags: flags, options: options)
    }

    /// Creates a sparse regular file, or opens an existing block device big enough.
    /// Returns whether a file was created (and so reads as zeros).
    static func create(path: String, size: Int64, options: FileDevice.Options) throws -> (Opened, Bool) {
        var st = ferry_stat()
        if ferry_stat_path(path, &st) == 0 && st.kind == 2 {
            let opened = try open(path: path, options: options)
            guard opened.size >= size else {
                opened.executor.shutdown { [fd = opened.fd, dfd = opened.directFd] in
                    _ = ferry_close(fd)
                    if dfd >= 0 { _ = ferry_close(dfd) }
                }
                throw FerryError(.tooSmall, "the block device holds \(opened.size) bytes, \(size) are needed", path: path)
            }
            return (opened, false)
        }
        var flags = O_RDWR
        if options.sync { flags |= ferry_O_DSYNC }
        let truncating = ferry_open(path, flags | O_CREAT | O_TRUNC, 0o644)
        guard truncating >= 0 else {
            let err = -truncating
            if err == EISDIR { throw isDirectory(path) }
            if err == ENOENT {
                let dir = directory(of: path)
                var dst = ferry_stat()
                if ferry_stat_path(dir, &dst) != 0 {
                    throw FerryError(.notFound, "cannot create: directory '\(dir)' does not exist", path: path, errno: err)
                }
            }
            throw FerryError.posix(err, "cannot create", path: path)
        }
        // ext4 (auto_da_alloc) marks a file truncated to zero and starts write-back of its data
        // at the next close of a descriptor of it: 0.35 s for 512 MiB, even with -t unsafe.
        // Closing the truncating descriptor before anything is written clears the mark; the
        // data goes through a second descriptor on the same inode.
        var fd = ferry_open("/proc/self/fd/\(truncating)", flags, 0)
        if fd < 0 { fd = ferry_open(path, flags, 0) }
        _ = ferry_close(truncating)
        guard fd >= 0 else { throw FerryError.posix(-fd, "cannot open after creating", path: path) }
        let rc = ferry_ftruncate(fd, size)
        guard rc == 0 else {
            _ = ferry_close(fd)
            throw FerryError.posix(-rc, "cannot set the size to \(size)", path: path)
        }
        return (try finish(fd: fd, path: path, flags: flags, options: options), true)
    }

    /// Everything after open(2): what the file is, its size, the O_DIRECT twin, the engine.
    /// Closes `fd` if it throws.
    private static func finish(fd: Int32, path: String, flags: Int32, options: FileDevice.Options) throws -> Opened {
        var directFd: Int32 = -1
        var ok = false
        defer {
            if !ok {
                _ = ferry_close(fd)
                if directFd >= 0 { _ = ferry_close(directFd) }
            }
        }
        var st = ferry_stat()
        let rc = ferry_fstat(fd, &st)
        guard rc == 0 else { throw FerryError.posix(-rc, "could not stat", path: path) }
        switch st.kind {
        case 1, 2: break
        case 3: throw isDirectory(path)
        default: throw FerryError(.invalidArgument, "is not a regular file or block device", path: path)
        }
        let isBlock = st.kind == 2
        var size = st.size
        var blockSize = 512
        if isBlock {
            var bytes: UInt64 = 0
            let r = ferry_blk_size(fd, &bytes)
            guard r == 0 else { throw FerryError.posix(-r, "could not get the size of the block device", path: path) }
            size = Int64(bytes)
            var ssz: UInt32 = 0
            if ferry_blk_logical_block_size(fd, &ssz) == 0 && ssz > 0 { blockSize = Int(ssz) }
        }
        var memoryAlignment = blockSize
        if options.direct {
            let d = try openDirect(path: path, flags: flags, st: st, isBlock: isBlock, blockSize: blockSize)
            (directFd, blockSize, memoryAlignment) = (d.fd, d.blockSize, d.memoryAlignment)
        } else if options.readOnly && options.directIfCold && !isBlock
                    && shouldReadDirect(fd: fd, allocated: st.blocks512 * 512) {
            // Best effort, and only where the kernel reports the alignment: otherwise reads go
            // through the page cache.
            if let d = try? openDirect(path: path, flags: flags, st: st, isBlock: isBlock, blockSize: blockSize) {
                if d.reported {
                    (directFd, blockSize, memoryAlignment) = (d.fd, d.blockSize, d.memoryAlignment)
                } else {
                    _ = ferry_close(d.fd)
                }
            }
        }
        let (executor, engine) = makeExecutor(options)
        ok = true
        return Opened(fd: fd, directFd: directFd, size: size, isBlockDevice: isBlock, readOnly: options.readOnly,
                      blockSize: blockSize, memoryAlignment: memoryAlignment, executor: executor, engine: engine)
    }

    /// Opens `path` again with O_DIRECT, checks that it is the same file as `st`, and works out
    /// the offset (`blockSize`) and memory alignment direct I/O needs; where the kernel does not
    /// report them (`reported` false) the given `blockSize` stands for both. Closes the new
    /// descriptor if it throws.
    private static func openDirect(path: String, flags: Int32, st: ferry_stat, isBlock: Bool, blockSize: Int) throws
        -> (fd: Int32, blockSize: Int, memoryAlignment: Int, reported: Bool) {
        let dfd = ferry_open(path, flags | ferry_O_DIRECT, 0)
        guard dfd >= 0 else {
            let err = -dfd
            if err == EINVAL {
                throw FerryError(.notSupported, "direct I/O (O_DIRECT) is not supported on this file system",
                                 path: path, errno: err)
            }
            throw FerryError.posix(err, "could not open for direct I/O", path: path)
        }
        var ok = false
        defer { if !ok { _ = ferry_close(dfd) } }
        var dst = ferry_stat()
        guard ferry_fstat(dfd, &dst) == 0, dst.dev == st.dev, dst.ino == st.ino else {
            throw FerryError(.other, "the file changed while it was being opened", path: path)
        }
        var blockSize = blockSize
        let memoryAlignment: Int
        var memAlign: UInt32 = 0
        var offsetAlign: UInt32 = 0
        let reported = ferry_dio_alignment(dfd, &memAlign, &offsetAlign) == 1
        if reported {
            guard offsetAlign > 0 else {
                throw FerryError(.notSupported, "direct I/O (O_DIRECT) is not supported on this file", path: path)
            }
            if !isBlock { blockSize = Int(offsetAlign) }
            memoryAlignment = Int(max(memAlign, 1))
        } else {
            memoryAlignment = blockSize
        }
        guard blockSize & (blockSize - 1) == 0, memoryAlignment & (memoryAlignment - 1) == 0 else {
            throw FerryError(.notSupported, "odd direct I/O alignment \(blockSize)", path: path)
        }
        ok = true
        return (dfd, blockSize, memoryAlignment, reported)
    }

    /// Files smaller than this are read through the page cache whatever is cached.
    static let directReadMinimum: Int64 = 64 << 20

    /// Whether a source is better read with O_DIRECT: it is large and less than half of what it
    /// holds is in the page cache. Read through the cache, a cold source costs a copy into
    /// the cache, readahead past the data, and memory the target's dirty pages then compete
    /// for (a cold 1 GiB half-data copy to qcow2: about 0.1 s of 0.55 s saved). A source that
    /// is cached already is quicker read from the cache, as is any file where the kernel
    /// cannot say (no cachestat before Linux 6.5).
    static func shouldReadDirect(fd: Int32, allocated: Int64) -> Bool {
        guard allocated >= directReadMinimum else { return false }
        let cached = ferry_cached_bytes(fd)
        return cached >= 0 && cached < allocated / 2
    }

    /// io_uring unless told otherwise or refused by the kernel; then the thread pool.
    private static func makeExecutor(_ options: FileDevice.Options) -> (any IOExecutor, FileDevice.IOEngine) {
        var wantRing: Bool
        switch options.engine {
        case .threads: wantRing = false
        case .uring: wantRing = true
        case .auto:
            wantRing = true
            if let env = getenv("FERRY_IO"), String(cString: env) == "threads" { wantRing = false }
        }
        if wantRing, let ring = try? RingEngine(entries: options.ringEntries) {
            return (ring, .uring)
        }
        return (ThreadEngine(), .threads)
    }

    private static func isDirectory(_ path: String) -> FerryError {
        FerryError(.isDirectory, "is a directory, not an image file", path: path, errno: EISDIR)
    }

    /// The directory part of a path, as the user wrote it.
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let dir = String(path[..<slash])
        return dir.isEmpty ? "/" : dir
    }
}
