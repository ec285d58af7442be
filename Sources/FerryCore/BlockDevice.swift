/// The one protocol that every endpoint (file, NBD, NFS, iSCSI, memory), every format
/// (raw, qcow2, ...) and every filter implements.
///
/// Offsets and lengths are in bytes. A device is a fixed-size array of `size` bytes:
///
///     0 <= offset <= offset + length <= size
///
/// Every call with a range outside that is a programming error of the caller and may trap.
/// Calls may run concurrently from many tasks; an implementation must be safe for that
/// (`Sendable`) and must not block the cooperative thread pool: blocking system calls go to
/// an I/O thread (io_uring, a thread pool, or a library's event loop) and the calling task
/// suspends until the result is back.
///
/// Buffers belong to the caller and stay valid until the call returns; an implementation
/// must not keep them.
public protocol BlockDevice: AnyObject, Sendable {
    /// What this device is called in messages: a path or URL, as the user wrote it.
    var name: String { get }

    /// Size in bytes. Fixed for the life of the device.
    var size: Int64 { get }

    /// Alignment and transfer limits. Callers keep to `alignment` for offsets and lengths
    /// (except at the very end of the device when `size` is not a multiple) and never pass
    /// more than `maximumTransfer` bytes to one `read` or `write`.
    var limits: BlockLimits { get }

    /// What the device can do cheaply. A call whose capability is absent still works
    /// (see each call) unless the call says otherwise.
    var capabilities: BlockCapabilities { get }

    /// Fills `buffer` with the bytes at `offset ..< offset + buffer.count`.
    ///
    /// Throws rather than return fewer bytes: a device that ends early (a file truncated
    /// under it) throws `FerryError` with code `.shortRead`.
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws

    /// Writes all of `buffer` at `offset`. With `.fua` the data is durable when the call
    /// returns. Throws `.readOnly` on a device opened read-only.
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws

    /// `write`, telling the caller through `issued` when the write has been handed to the
    /// device: any call made after `issued` reaches the device after this write. Returns,
    /// as `write` does, only once the write is complete. `issued` is called at most once,
    /// from any thread, and not at all when the call fails before the write was handed over.
    ///
    /// That lets a caller that must keep writes in order start the next write while this
    /// one is in flight. The default calls `issued` after `write` completes.
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
               issued: @escaping @Sendable () -> Void) async throws

    /// `writeZeroes` with an `issued` hand-over, as for `write(at:from:flags:issued:)`.
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags,
                     issued: @escaping @Sendable () -> Void) async throws

    /// Makes `offset ..< offset + length` read as zeros.
    ///
    /// - `.mayUnmap`: the device may deallocate the range (punch a hole, unmap) as long as
    ///   it then reads as zeros. Without it the range stays allocated.
    /// - `.fastOnly`: fail with code `.notSupported` up front, without touching the range,
    ///   if zeroing cannot be done faster than writing zeros. Without it a device that has
    ///   no cheap way writes zero bytes.
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws

    /// Tells the device the range is no longer needed. Afterwards the range's contents are
    /// unspecified (it may or may not read as zeros). A device without `.discard` ignores it.
    func discard(at offset: Int64, length: Int64) async throws

    /// Describes the allocation of the bytes from `range.lowerBound`.
    ///
    /// The result is non-empty, ascending and contiguous: the first extent starts at
    /// `range.lowerBound`, each next one starts where the previous ended, and none ends past
    /// `size`. It may stop short of `range.upperBound` (the caller asks again from where it
    /// stopped) and the last extent may run past `range.upperBound`. A device without
    /// `.extents` answers one `.data` extent.
    func extents(in range: Range<Int64>) async throws -> [Extent]

    /// The thread that completes this device's requests, as an executor, when work between
    /// its requests may run there (an NBD connection's event loop): a copy between two such
    /// devices runs its workers on the source's (`CopyEngine.workersExecutor`). nil: none.
    var completionExecutor: (any TaskExecutor)? { get }

    /// Makes every completed write durable. A device without `.flush` returns at once.
    func flush() async throws

    /// Requests the device serves at once to best effect: its connections times what its
    /// server takes from each. A copy that finds its own depth starts at least this deep.
    /// 1 (the default) for a device that does not say.
    var concurrency: Int { get }

    /// Releases the device's resources. Called once; no other call follows it.
    /// Does not flush: callers that want durability call `flush()` first.
    func close() async throws
}

/// An endpoint whose file can be cut to a new length while open: a format that grows its
/// file (qcow2) cuts a new one to what it used. (Local files are cut by path after close.)
public protocol TruncatableDevice: BlockDevice {
    func truncateFile(to length: Int64) async throws
}

/// Alignment and transfer limits of a device, in bytes.
public struct BlockLimits: Sendable, Equatable {
    /// Offsets and lengths of reads and writes should be multiples of this (a power of two;
    /// 1 means any). O_DIRECT files, iSCSI LUNs and some NBD servers need more than 1.
    public var alignment: Int
    /// The transfer size the device works best with (a multiple of `alignment`).
    public var preferredTransfer: Int
    /// The largest `read` or `write` the device accepts in one call (a multiple of `alignment`).
    public var maximumTransfer: Int

    public init(alignment: Int = 1, preferredTransfer: Int = 4096, maximumTransfer: Int = 32 << 20) {
        precondition(alignment > 0 && alignment & (alignment - 1) == 0, "alignment must be a power of two")
        self.alignment = alignment
        self.preferredTransfer = preferredTransfer
        self.maximumTransfer = maximumTransfer
    }
}

/// A device that can have the kernel copy a range of it into another device without the
/// bytes passing through the caller (`copy_file_range` between local files: `convert -C`).
public protocol RangeCopyingDevice: BlockDevice {
    /// Copies `length` bytes at `offset` to `target` at `targetOffset`. False, with nothing
    /// written, when it cannot for this pair (another kind of device, another filesystem, a
    /// kernel that refuses): the caller then copies the bytes itself.
    func copyRange(at offset: Int64, length: Int64, to target: any BlockDevice, at targetOffset: Int64) async throws -> Bool
}

/// What a device can do cheaply. Absent capabilities are emulated or ignored as each call says.
public struct BlockCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// The device accepts writes. A read-only device throws `.readOnly` from write calls.
    public static let write = BlockCapabilities(rawValue: 1 << 0)
    /// `writeZeroes` is cheaper than writing zero bytes (fallocate, WRITE SAME, NBD zero).
    public static let zero = BlockCapabilities(rawValue: 1 << 1)
    /// `writeZeroes` honours `.fastOnly` (answers `.notSupported` quickly when it would be slow).
    public static let fastZero = BlockCapabilities(rawValue: 1 << 2)
    /// `discard` really releases space.
    public static let discard = BlockCapabilities(rawValue: 1 << 3)
    /// `extents` tells real allocation, not just one data extent.
    public static let extents = BlockCapabilities(rawValue: 1 << 4)
    /// `flush` makes data durable (the device has a volatile cache).
    public static let flush = BlockCapabilities(rawValue: 1 << 5)
    /// Writes with `.fua` are supported natively.
    public static let fua = BlockCapabilities(rawValue: 1 << 6)
    /// Several connections to the same device see each other's flushed writes (NBD multi-conn).
    public static let multiConn = BlockCapabilities(rawValue: 1 << 7)
    /// The whole device reads as zeros now: it was just created, or the user said so.
    /// A copy may skip zero runs on such a target.
    public static let zeroInit = BlockCapabilities(rawValue: 1 << 8)
    /// Reading a range that `extents` calls `.zero` or `.unallocated` costs no I/O (a hole in
    /// a local file, a zero or unallocated cluster of an image without a backing file): a
    /// reader may read across a short one rather than split its request.
    public static let cheapZeroReads = BlockCapabilities(rawValue: 1 << 9)
    /// Writes must arrive in ascending offset order, each after the one before completed its
    /// hand-over (a streamed image appended front to back). A copy into such a device writes
    /// in order whatever it was asked (`-W` is ignored); zero runs may be skipped, not rewound.
    public static let sequentialWrites = BlockCapabilities(rawValue: 1 << 10)
    /// Where a write lands does not depend on when it arrives (a file, a block device, an
    /// export, a preallocated image): writes may complete in any order at no cost to the
    /// layout, and a copy lets them unless told otherwise. Without it (an image that
    /// allocates as data arrives) writes go out in guest order, as qemu-img's do without `-W`.
    public static let anyWriteOrder = BlockCapabilities(rawValue: 1 << 11)
}

/// Flags for `BlockDevice.write`.
public struct WriteFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Force unit access: the data is durable when the write returns.
    public static let fua = WriteFlags(rawValue: 1 << 0)
}

/// Flags for `BlockDevice.writeZeroes`.
public struct ZeroFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The range may be deallocated, as long as it then reads as zeros.
    public static let mayUnmap = ZeroFlags(rawValue: 1 << 0)
    /// Fail with `.notSupported` rather than fall back to writing zero bytes.
    public static let fastOnly = ZeroFlags(rawValue: 1 << 1)
    /// The written zeros are durable when the call returns.
    public static let fua = ZeroFlags(rawValue: 1 << 2)
}

extension BlockDevice {
    public var concurrency: Int { 1 }

    public var completionExecutor: (any TaskExecutor)? { nil }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        try await write(at: offset, from: buffer, flags: flags)
        issued()
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags,
                            issued: @escaping @Sendable () -> Void) async throws {
        try await writeZeroes(at: offset, length: length, flags: flags)
        issued()
    }

    /// Checks a range against the device size; used by implementations for a clear error.
    @inlinable
    public func checkRange(_ offset: Int64, _ length: Int64) throws {
        guard offset >= 0, length >= 0, offset <= size, length <= size - offset else {
            throw FerryError(.invalidArgument, "request \(offset)+\(length) is outside the device (size \(size))", path: name, offset: offset)
        }
    }
}

/// A device that implements `write(at:from:flags:issued:)` itself (it can tell when a write is
/// queued): plain `write` is that call with nobody to tell.
public protocol HandsOverWrites: BlockDevice {}

extension HandsOverWrites {
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await write(at: offset, from: buffer, flags: flags, issued: {})
    }
}

/// Storage that opening the device made (a new image in a cluster) and that the device can
/// delete again: a copy into it that fails asks for that before closing it. (New local files
/// are removed by path instead.)
public protocol CreatedStorage: BlockDevice {
    /// True if this device made its storage when it was opened.
    var created: Bool { get }
    /// Deletes the storage when the device is closed, if the device made it.
    func removeWhenClosed()
}
