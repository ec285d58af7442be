import CLibNFS
import FerryCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A file on an NFS server as a `BlockDevice`, through libnfs's asynchronous API.
///
/// URLs are libnfs's: `nfs://SERVER[:PORT]/EXPORT/PATH[?OPTIONS]`, where libnfs itself parses
/// and applies the options (`version=3|4`, `nfsport=`, `mountport=`, `uid=`, `gid=`,
/// `readahead=`, `autoreconnect=`, `tcp-syncnt=`, ...). Without `autoreconnect` in the URL
/// a lost session fails the requests rather than being retried for ever.
///
/// Each connection is a libnfs context with its own mount and file handle, owned by one
/// event-loop thread (`NFSConnection`). With several connections every request goes to the
/// least busy one. Reads and writes larger than the server's maximum (libnfs 4.0 caps it at
/// 1 MiB) are split inside the device and the pieces sent at once. NFSv3 and v4 have no
/// cheap zeroing or allocation map that libnfs 4.0 exposes: zeroes are written as zero
/// bytes, and the whole file is one data extent. `flush` sends COMMIT (`nfs_fsync`) on every
/// connection.
public final class NFSDevice: NetworkDevice, TruncatableDevice {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let readOnly: Bool
    public var kind: String { "NFS file" }
    let pool: SessionPool<NFSConnection>
    let readMax: Int
    let writeMax: Int
    private let gauge: InFlightGauge

    /// Connections (libnfs sessions) in use.
    public var connectionCount: Int { pool.count }
    /// The most NFS RPCs that were ever in flight at once, over all connections.
    public var peakInFlight: Int { gauge.peak }
    /// The largest READ or WRITE sent so far (for tests of the splitting).
    public var largestTransfer: Int { gauge.largestTransfer }

    /// True if `location` is an NFS URL.
    public static func handles(_ location: String) -> Bool { location.hasPrefix("nfs://") }

    /// Opens an existing file. With `readOnly` false it is opened for writing.
    public static func open(_ url: String, readOnly: Bool, connections: Int = 1,
                            resilience: Resilience = .standard) async throws -> NFSDevice {
        try await connect(url, first: readOnly ? .readOnly : .readWrite, rest: readOnly ? .readOnly : .readWrite,
                          connections: connections, zeroInit: false, resilience: resilience)
    }

    /// Creates the file (or truncates an existing one) and sets its size, sparse: the new
    /// file reads as zeros (`.zeroInit`).
    public static func create(_ url: String, size: Int64, connections: Int = 1,
                              resilience: Resilience = .standard) async throws -> NFSDevice {
        guard size >= 0 else { throw FerryError(.invalidArgument, "negative size \(size)", path: url) }
        return try await connect(url, first: .create(size: size), rest: .readWrite, connections: connections, zeroInit: true,
                                 resilience: resilience)
    }

    private static func connect(_ url: String, first: NFSOpenMode, rest: NFSOpenMode,
                                connections wanted: Int, zeroInit: Bool, resilience: Resilience) async throws -> NFSDevice {
        ignoreSIGPIPE()
        let gauge = InFlightGauge()
        let (c0, info) = try await NFSContext.connect(url: url, mode: first, index: 0, gauge: gauge, resilience: resilience)
        let pool = try await SessionPool.open(beside: c0, count: wanted) { i in
            try await NFSContext.connect(url: url, mode: rest, index: i, gauge: gauge, resilience: resilience).0
        }
        let readOnly: Bool
        if case .readOnly = first { readOnly = true } else { readOnly = false }
        return NFSDevice(name: url, info: info, readOnly: readOnly, zeroInit: zeroInit, gauge: gauge,
                         pool: pool)
    }

    private init(name: String, info: NFSFileInfo, readOnly: Bool, zeroInit: Bool, gauge: InFlightGauge,
                 pool: SessionPool<NFSConnection>) {
        self.name = name
        self.size = info.size
        self.readOnly = readOnly
        self.gauge = gauge
        self.pool = pool
        readMax = info.readMax
        writeMax = info.writeMax
        let maximum = readOnly ? readMax : min(readMax, writeMax)
        // Written to, the device takes calls larger than wsize and sends their pieces together
        // (`perform`): a caller that split them itself sent one piece per round trip. Read from,
        // it keeps to rsize, so the copy engine's requests are one READ each: 2 MiB requests
        // split over sessions made ganesha read a cold file out of order (1 GiB NFS -> local,
        // unflushed: 0.79 s against 0.59 s).
        limits = BlockLimits(alignment: 1, preferredTransfer: maximum,
                             maximumTransfer: readOnly ? maximum : max(maximum, 32 << 20))
        var caps: BlockCapabilities = [.flush]
        if !readOnly { caps.formUnion([.write, .anyWriteOrder]) }
        if zeroInit { caps.insert(.zeroInit) }
        capabilities = caps
    }

    /// A peer that goes away must fail a write with EPIPE, not kill the process.
    private static func ignoreSIGPIPE() {
        _ = signal(SIGPIPE, SIG_IGN)
    }

    // MARK: Splitting requests

    /// Sends `length` bytes from `offset` as RPCs of at most `step`, all at once, and waits
    /// for all of them; `make` builds the RPC at (index into the request, length).
    private func perform(offset: Int64, length: Int, step: Int, issued: (@Sendable () -> Void)? = nil,
                         _ make: (Int, Int) -> NFSOperation) async throws {
        try await pool.perform(count: Int64(length), step: Int64(step), issued: issued) { done, n, call in
            NFSPiece(make(Int(done), Int(n)), at: offset + done, call: call)
        }
    }

    // MARK: BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        try await perform(offset: offset, length: buffer.count, step: readMax) { i, n in .read(base + i, n) }
    }

    /// Issued once every piece is queued on a session; with `.fua`, after the COMMIT.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        guard let base = try checkWrite(offset, buffer) else { issued(); return }
        let fua = flags.contains(.fua)
        try await perform(offset: offset, length: buffer.count, step: writeMax, issued: fua ? nil : issued) { i, n in
            .write(base + i, n)
        }
        if fua {
            try await flush()
            issued()
        }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkWrite(offset, length)
        if flags.contains(.fastOnly) {
            throw FerryError(.notSupported, "NFS cannot zero faster than writing zeros", path: name, offset: offset)
        }
        guard length > 0 else { return }
        // No ALLOCATE/DEALLOCATE in libnfs 4.0: zero bytes from one shared buffer, a bounded
        // number of chunks at a time so a huge range does not queue millions of pieces.
        let zeros = SharedZeros.shared
        try await pool.performInBatches(count: length, step: Int64(min(zeros.count, writeMax))) { done, n, call in
            NFSPiece(.write(zeros.pointer, Int(n)), at: offset + done, call: call)
        }
        if flags.contains(.fua) { try await flush() }
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWrite(offset, length)
        // No DEALLOCATE in libnfs 4.0: nothing to do (a discarded range's contents are
        // unspecified).
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, Int64(range.count))
        // libnfs 4.0 has no NFSv4.2 SEEK: the whole file is data.
        return [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    public func flush() async throws {
        guard !readOnly else { return }
        // COMMIT on every session: each one commits what the server holds unstable for the file.
        try await pool.performOnEach { NFSPiece(.fsync, at: 0, call: $0) }
    }

    /// Cuts (or extends) the file on the server to `length` bytes. For a format that knows,
    /// once it is complete, how much of the file it used; `size` stays what it was.
    public func truncateFile(to length: Int64) async throws {
        try checkWritable(length)
        try await pool.performOnEach([pool.sessions[0]]) { NFSPiece(.truncate(length), at: 0, call: $0) }
    }

    public func close() async throws {
        await pool.stop()
    }
}
