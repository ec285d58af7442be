import CFerryNBD
import CLibNBD
import FerryCore

#if canImport(Glibc)
import Glibc
#endif

/// An NBD export as a `BlockDevice`, through libnbd's asynchronous API.
///
/// URLs are those of the NBD URI specification that libnbd parses:
/// `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`.
///
/// Each connection is a libnbd handle owned by one event-loop thread (`NBDConnection`). When
/// the server advertises multi-conn, several connections are opened and requests fill them in
/// turn (16 pieces each, then the least busy); otherwise one connection carries everything, because writes over
/// several connections are only coherent with multi-conn.
///
/// Requests larger than the server's maximum block size are split inside the device, and the
/// pieces are sent at once (over several connections when there are several); so `limits`
/// advertises a maximum of at least 32 MiB whatever the server's (`serverLimits` has the
/// server's). Write-zeroes, trim and block-status requests are split at `commandLimit`, under
/// the protocol's 32-bit lengths (nbdkit's blocksize-policy filter in error mode accepts those
/// above the maximum block size; it refuses only oversized reads and writes).
public final class NBDDevice: NetworkDevice {
    public let name: String
    public let size: Int64
    /// What callers keep to: the server's minimum block size as the alignment, its preferred
    /// size, and at least 32 MiB as the maximum (larger requests are split here, see
    /// `serverLimits`).
    public let limits: BlockLimits
    /// The server's own block sizes (minimum, preferred, maximum; 32 MiB when it gives no
    /// maximum, at most libnbd's 64 MiB): no NBD command sent carries more than the maximum.
    public let serverLimits: BlockLimits
    public let capabilities: BlockCapabilities
    /// Opened for reading only: write calls throw `.readOnly`.
    public let readOnly: Bool
    public var kind: String { "NBD export" }
    /// What the server advertised.
    let info: ServerInfo
    let pool: SessionPool<NBDConnection>
    /// Largest payload of one read or write command (the server's maximum, at most 64 MiB).
    let maximumPayload: Int
    /// Largest length of one write-zeroes, trim or block-status command.
    let commandLimit: Int64
    private let largest = HighWaterMark()

    /// Connections in use (several only when the server advertises multi-conn).
    public var connectionCount: Int { pool.count }

    /// The largest read or write command sent so far (for tests of the splitting).
    public var largestCommand: Int { largest.current }

    /// Default maximum request when the server gives none (the protocol's portable limit).
    public static let defaultMaximum = 32 << 20
    /// libnbd refuses read and write payloads above 64 MiB.
    public static let libnbdMaximum = 64 << 20

    /// True if `location` is an NBD URL this endpoint opens.
    public static func handles(_ location: String) -> Bool {
        location.hasPrefix("nbd://") || location.hasPrefix("nbd+unix://")
    }

    /// Loads libnbd ahead of the first connection (`LibraryPreload`): with GnuTLS, libxml2
    /// and ICU it takes 2-3 ms here with a warm page cache, a connection's time again.
    public static let preloading = LibraryPreload { _ = ferry_nbd_load_error() }

    /// Connects to the export at `url`. With `readOnly` false the export must be writable.
    /// `connections` is how many to open when the server allows several (multi-conn);
    /// `resilience` how they ride out a failing server.
    public static func open(_ url: String, readOnly: Bool, connections wanted: Int = 4,
                            resilience: Resilience = .standard) async throws -> NBDDevice {
        let (first, info) = try await NBDHandle.connect(uri: url, name: url, index: 0, resilience: resilience)
        do {
            if !readOnly && info.readOnly {
                throw FerryError(.readOnly, "the NBD export is read-only", path: url)
            }
            guard info.size >= 0 else {
                throw FerryError(.io, "the server did not say the export's size", path: url)
            }
        } catch {
            await first.stop()
            throw error
        }
        // Pieces one connection carries before the next one is used: nbdkit serves 16
        // requests of a connection at once by default, and qemu-nbd takes 16 per client.
        // Filling connections in turn rather than spreading every request keeps few event
        // loops waking while the load is light (each wake is a pipe write and a thread
        // switch; on 2 CPUs shared with the servers that cost 30% of an NBD-to-NBD copy),
        // and uses them all once it is heavy.
        let pool = try await SessionPool.open(beside: first, count: info.offers.contains(.multiConn) ? wanted : 1,
                                              policy: .fillInTurn(upTo: Self.perConnection)) { i in
            try await NBDHandle.connect(uri: url, name: url, index: i, resilience: resilience).0
        }
        return NBDDevice(name: url, info: info, readOnly: readOnly, pool: pool)
    }

    /// Requests one connection carries before the next is used (see `open`).
    static let perConnection = 16

    /// Every connection filled: a copy that starts shallower leaves all but one idle until
    /// its depth climbs (nbdkit, 1 GiB half data, cold: the default took 1.6 times -m 64's time).
    public var concurrency: Int { pool.count * Self.perConnection }

    /// The first connection's loop: the one a light load keeps to (`perConnection`).
    public var completionExecutor: (any TaskExecutor)? { pool.sessions[0].executor }

    init(name: String, info: ServerInfo, readOnly: Bool, pool: SessionPool<NBDConnection>) {
        self.name = name
        self.info = info
        self.size = info.size
        self.readOnly = readOnly
        self.pool = pool

        // The protocol requires the minimum to be a power of two; anything else is ignored.
        var alignment = Int(info.blocks.minimum)
        if alignment < 1 || alignment & (alignment - 1) != 0 || alignment > 64 << 10 { alignment = 1 }
        var maximum = info.blocks.maximum > 0 ? Int(min(info.blocks.maximum, Int64(Self.libnbdMaximum))) : Self.defaultMaximum
        maximum = max(alignment, maximum / alignment * alignment)
        var preferred = info.blocks.preferred > 0 ? Int(info.blocks.preferred) : max(4096, alignment)
        preferred = min(maximum, max(alignment, preferred / alignment * alignment))
        serverLimits = BlockLimits(alignment: alignment, preferredTransfer: preferred, maximumTransfer: maximum)
        maximumPayload = maximum
        // Callers may hand over up to 32 MiB (or the server's maximum, if larger): a request
        // above the server's maximum is cut into pieces that go out together, so one large
        // request from the copy engine becomes many in flight. Were the server's maximum
        // (often 256 KiB to 4 MiB) passed on, a copy with 8 workers would keep only 8 small
        // requests in flight on a latency-bound link, and in-order writes only one.
        let accepted = max(maximum, Self.defaultMaximum / alignment * alignment)
        limits = BlockLimits(alignment: alignment, preferredTransfer: preferred, maximumTransfer: accepted)
        // Well under the protocol's 32-bit lengths, and a multiple of the alignment.
        commandLimit = Int64((1 << 30) / alignment * alignment)

        var caps = info.offers
        if !readOnly { caps.formUnion([.write, .anyWriteOrder]) }
        // Fast zero is a flag of write zeroes.
        if !caps.contains(.zero) { caps.remove(.fastZero) }
        // Never .zeroInit: NBD has no way to say an export reads as zeros.
        capabilities = caps
    }

    // MARK: Splitting requests

    /// Sends `length` bytes from `offset` as commands of at most `step`, all at once, and
    /// waits for all of them; `make` builds the command at (index into the request, length).
    private func perform(offset: Int64, length: Int64, step: Int64, issued: (@Sendable () -> Void)? = nil,
                         _ make: (Int, Int64) -> NBDOperation) async throws {
        try await pool.perform(count: length, step: step, issued: issued) { done, n, call in
            Piece(make(Int(done), n), at: offset + done, call: call)
        }
    }

    // MARK: BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        largest.note(min(buffer.count, maximumPayload))
        try await perform(offset: offset, length: Int64(buffer.count), step: Int64(maximumPayload)) { i, n in
            .read(base + i, Int(n))
        }
    }

    /// Issued once every piece is queued on a connection.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        guard let base = try checkWrite(offset, buffer) else { issued(); return }
        let fua = flags.contains(.fua)
        let nbdFlags: UInt32 = fua && info.offers.contains(.fua) ? UInt32(LIBNBD_CMD_FLAG_FUA) : 0
        largest.note(min(buffer.count, maximumPayload))
        // Emulated FUA needs the flush to follow completion, so the hand-over waits for it.
        let early: (@Sendable () -> Void)? = fua && !info.offers.contains(.fua) ? nil : issued
        try await perform(offset: offset, length: Int64(buffer.count), step: Int64(maximumPayload), issued: early) { i, n in
            .write(base + i, Int(n), flags: nbdFlags)
        }
        if fua && !info.offers.contains(.fua) { try await flush() }
        if early == nil { issued() }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try await writeZeroes(at: offset, length: length, flags: flags, issued: {})
    }

    /// Issued once every piece is queued on a connection.
    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags,
                            issued: @escaping @Sendable () -> Void) async throws {
        try checkWrite(offset, length)
        let fastOnly = flags.contains(.fastOnly)
        if fastOnly && !capabilities.contains(.fastZero) {
            throw FerryError(.notSupported, "the NBD server cannot zero quickly", path: name, offset: offset)
        }
        guard length > 0 else { issued(); return }
        let fua = flags.contains(.fua)
        // Emulated FUA needs the flush to follow completion, so the hand-over waits for it.
        let early: (@Sendable () -> Void)? = fua && !info.offers.contains(.fua) ? nil : issued
        if info.offers.contains(.zero) {
            var nbdFlags: UInt32 = 0
            if !flags.contains(.mayUnmap) { nbdFlags |= UInt32(LIBNBD_CMD_FLAG_NO_HOLE) }
            if fastOnly { nbdFlags |= UInt32(LIBNBD_CMD_FLAG_FAST_ZERO) }
            if fua && info.offers.contains(.fua) { nbdFlags |= UInt32(LIBNBD_CMD_FLAG_FUA) }
            try await perform(offset: offset, length: length, step: commandLimit, issued: early) { _, n in
                .zero(length: n, flags: nbdFlags)
            }
        } else {
            // No write-zeroes on this server: write zero bytes from one shared zero buffer.
            let zeros = SharedZeros.shared
            let step = Int64(min(zeros.count, maximumPayload))
            let nbdFlags: UInt32 = fua && info.offers.contains(.fua) ? UInt32(LIBNBD_CMD_FLAG_FUA) : 0
            try await perform(offset: offset, length: length, step: step, issued: early) { _, n in
                .write(zeros.pointer, Int(n), flags: nbdFlags)
            }
        }
        if fua && !info.offers.contains(.fua) { try await flush() }
        if early == nil { issued() }
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWrite(offset, length)
        guard info.offers.contains(.discard), length > 0 else { return }
        try await perform(offset: offset, length: length, step: commandLimit) { _, n in .trim(length: n) }
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, Int64(range.count))
        let start = range.lowerBound
        guard start < size, !range.isEmpty else { return [Extent(offset: start, length: 0, kind: .data)] }
        guard info.offers.contains(.extents) else { return [Extent(offset: start, length: size - start, kind: .data)] }
        // Within the server's limits: lengths under 32 bits, ends on the minimum block size
        // (except at the end of the export).
        var length = min(Int64(range.count), commandLimit)
        let align = Int64(limits.alignment)
        if start + length < size && align > 1 {
            length = max(align, (start + length) / align * align - start)
            length = min(length, size - start)
        }
        let collector = ExtentCollector(start: start)
        try await perform(offset: start, length: length, step: length) { _, n in
            .blockStatus(length: n, into: collector)
        }
        // An answer may cover less than asked (the caller asks again) or run past the end of
        // the export (clipped).
        var out: [Extent] = []
        var cursor = start
        for var e in collector.extents {
            guard e.offset == cursor else { break }
            if e.end > size { e.length = size - e.offset }
            guard e.length > 0 else { break }
            out.append(e)
            cursor = e.end
        }
        guard !out.isEmpty else {
            throw FerryError(.io, "the server's block status reply has no extents", path: name, offset: start)
        }
        return out
    }

    public func flush() async throws {
        guard info.offers.contains(.flush), !readOnly else { return }
        // With multi-conn a flush on one connection covers writes completed on all of them;
        // without it there is only one connection.
        try await perform(offset: 0, length: 1, step: 1) { _, _ in .flush }
    }

    public func close() async throws {
        await pool.stop()
    }
}
