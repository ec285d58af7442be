import FerryCore

// API SKELETON: to be replaced by the real implementation (io_uring + thread-pool fallback).

/// A local regular file or block device as a `BlockDevice`.
public final class FileDevice: BlockDevice {
    /// How I/O is issued.
    public enum IOEngine: String, Sendable {
        /// io_uring if the kernel allows it, else the thread pool. `FERRY_IO=threads` in the
        /// environment forces the thread pool.
        case auto
        case uring
        case threads
    }

    public struct Options: Sendable {
        public var readOnly: Bool
        /// O_DIRECT (bypass the page cache; requests aligned to the logical block size).
        public var direct: Bool
        /// O_DSYNC.
        public var sync: Bool
        public var engine: IOEngine
        public init(readOnly: Bool = false, direct: Bool = false, sync: Bool = false, engine: IOEngine = .auto) {
            self.readOnly = readOnly
            self.direct = direct
            self.sync = sync
            self.engine = engine
        }
    }

    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    /// True for a block device, false for a regular file.
    public let isBlockDevice: Bool
    /// The engine actually in use (`uring` or `threads`).
    public let engineInUse: IOEngine

    private init() { fatalError("skeleton") }

    /// Opens an existing file or block device.
    public static func open(path: String, options: Options = Options()) async throws -> FileDevice { fatalError("skeleton") }

    /// Creates (or truncates) a regular file of `size` bytes, sparse, reading as zeros
    /// (`.zeroInit`). An existing block device is opened instead, if it is at least `size`
    /// bytes (no `.zeroInit`).
    public static func create(path: String, size: Int64, options: Options = Options()) async throws -> FileDevice { fatalError("skeleton") }

    /// Bytes the file takes on disk (st_blocks x 512); the device size for a block device.
    public static func allocatedSize(path: String) throws -> Int64 { fatalError("skeleton") }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws { fatalError("skeleton") }
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws { fatalError("skeleton") }
    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws { fatalError("skeleton") }
    public func discard(at offset: Int64, length: Int64) async throws { fatalError("skeleton") }
    public func extents(in range: Range<Int64>) async throws -> [Extent] { fatalError("skeleton") }
    public func flush() async throws { fatalError("skeleton") }
    public func close() async throws { fatalError("skeleton") }
}
