import FerryCore

/// A target whose clusters can be compressed by the copy engine's workers (in parallel)
/// and then appended to the image in order (`writeCompressed`, called in write order).
public protocol ClusterCompressingDevice: BlockDevice {
    /// True once `enableCompression()` was called.
    var compressesWrites: Bool { get }
    /// From now on, whole-cluster writes are compressed; `limits.alignment` becomes the
    /// cluster size. Call before the first write.
    func enableCompression()
    /// Compresses `data` (the guest bytes at `offset`, which is cluster-aligned) cluster by
    /// cluster into `output` (at least `data.count` bytes). Runs in the calling task.
    func compress(_ data: UnsafeRawBufferPointer, at offset: Int64, into output: UnsafeMutableRawBufferPointer) -> [CompressedPiece]
    /// Stores what `compress` produced (reading it from `output`).
    func writeCompressed(_ pieces: [CompressedPiece], from output: UnsafeRawBufferPointer) async throws
}

/// One cluster prepared by `ClusterCompressingDevice.compress`.
public struct CompressedPiece: Sendable, Equatable {
    public var guestOffset: Int64
    /// Bytes in the output buffer: compressed, or the cluster as it was (it did not shrink).
    public var start: Int
    public var length: Int
    /// Guest bytes the piece stands for.
    public var guestLength: Int
    public var compressed: Bool
}

/// An image whose metadata is written when it is committed: until then the file carries a
/// marker that makes it unreadable (to qemu and Ferry alike) as an incomplete image.
public protocol CommittingDevice: BlockDevice {
    /// Writes all metadata, then (after a flush when `durable`) the final header without the
    /// incomplete marker. A later write puts the marker back until the next commit.
    func commit(durable: Bool) async throws
    /// Bytes of the host file in use after the last commit (the rest may be cut off).
    var usedFileSize: Int64 { get }
}

/// A lock that can be held across suspension points (for rare read-modify-write paths).
final class AsyncMutex: Sendable {
    private let state = Locked<(locked: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func lock() async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let now: Bool = state.withLock { s in
                if !s.locked { s.locked = true; return true }
                s.waiters.append(c)
                return false
            }
            if now { c.resume() }
        }
    }

    func unlock() {
        let next: CheckedContinuation<Void, Never>? = state.withLock { s in
            if s.waiters.isEmpty { s.locked = false; return nil }
            return s.waiters.removeFirst()
        }
        next?.resume()
    }
}

/// A new qcow2 image being written (by `convert` or `create`).
///
/// Allocation: one bump pointer through the host file. Data clusters and L2 tables take the
/// next whole cluster; compressed clusters take the next bytes (a new cluster is started where
/// the refcount width could not count one more user of the current one). Nothing is ever
/// freed or reused while the image is written; a cluster whose guest data is replaced (or
/// zeroed with unmap) simply ends up with refcount 0.
///
/// Metadata: the L1 table and the L2 tables live in memory and are written at `commit`;
/// refcounts are not kept as the image is written but computed at `commit` from what the
/// L1 and L2 tables reference, so they cannot disagree with the mapping. The refcount blocks
/// and table are appended after the last data cluster, then the final header is written over
/// the first cluster, which until then carries the incomplete marker (incompatible bit 63,
/// named in the feature table, so qemu-img says "Unsupported qcow2 feature(s): ferry:
/// conversion incomplete").
///
/// Concurrency: the mapping is behind one lock held only to look up and update entries;
/// data is read, compressed and written outside it, in parallel.
public final class QCOW2Writer: ClusterCompressingDevice, CommittingDevice, LayeredDevice, @unchecked Sendable {
    public let name: String
    public let size: Int64
    public let backing: (any BlockDevice)?
    let file: any BlockDevice
    let opts: QCOW2CreateOptions
    let cs: Int64
    let clusterBits: Int64
    let l2Entries: Int
    let l1Size: Int
    let l1Offset: Int64
    let l1Clusters: Int
    /// Data and metadata must stay below this; the refcount structures go above it.
    let dataLimit: Int64
    let maxRefcount: UInt64
    let compressors: Compressors
    let decompressors: Decompressors
    private let slow = AsyncMutex()

    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let compressedBit: UInt64 = 1 << 62
    static let copiedBit: UInt64 = 1 << 63

    struct State {
        var l1: [Int64]
        var tables: [Int: [UInt64]] = [:]
        var dirty: Set<Int> = []
        var next: Int64
        /// Host cluster holding the last compressed bytes, and how many clusters use it.
        var packCluster: Int64 = -1
        var packCount: UInt64 = 0
        var markerOnDisk = true
        var compress = false
        var used: Int64 = 0
        /// Clusters of persistent bitmaps (bits, tables, directory): first and count.
        var bitmapClusters: [(first: Int64, count: Int64)] = []
        /// The bitmaps extension the header is to carry, and whether the header on disk lacks it.
        var bitmaps: (count: UInt32, directorySize: UInt64, directoryOffset: UInt64)?
        var bitmapsUnwritten = false
    }
    private let state: Locked<State>

    // MARK: - layout

    struct Layout {
        var l1Size: Int
        var l1Clusters: Int
        var dataLimit: Int64
        var fileSize: Int64
    }

    static func refcountRegion(clusters: Int64, clusterSize: Int64, refcountOrder: UInt32) -> (blocks: Int64, table: Int64) {
        let perBlock = (clusterSize * 8) >> Int64(refcountOrder)
        var blocks: Int64 = 0, table: Int64 = 0
        while true {
            let total = clusters + blocks + table
            let nb = (total + perBlock - 1) / perBlock
            let nt = max(1, (nb * 8 + clusterSize - 1) / clusterSize)
            if nb == blocks && nt == table { return (blocks, table) }
            blocks = nb
            table = nt
        }
    }

    static func layout(size: Int64, opts: QCOW2CreateOptions) -> Layout {
        let cs = Int64(opts.clusterSize)
        let l1Size = Int((size + opts.l2Coverage - 1) / opts.l2Coverage)
        let l1Clusters = Int((Int64(l1Size) * 8 + cs - 1) / cs)
        let dataClusters = (size + cs - 1) / cs
        // Header, L1, every L2 table, every data cluster, and slack (a quarter more) for
        // clusters written twice in new places (compressed ones, which are never reused).
        // The file is sparse and cut to what is used, so the slack costs nothing.
        let limit = cs * (1 + Int64(l1Clusters) + Int64(l1Size) + dataClusters + dataClusters / 4 + 16)
        let r = refcountRegion(clusters: limit / cs, clusterSize: cs, refcountOrder: opts.refcountOrder)
        return Layout(l1Size: l1Size, l1Clusters: l1Clusters, dataLimit: limit, fileSize: limit + (r.blocks + r.table + 1) * cs)
    }

    init(name: String, file: any BlockDevice, size: Int64, opts: QCOW2CreateOptions, backing: (any BlockDevice)?) {
        self.name = name
        self.file = file
        self.size = size
        self.opts = opts
        self.backing = backing
        cs = Int64(opts.clusterSize)
        clusterBits = Int64(opts.clusterBits)
        l2Entries = opts.l2Entries
        let lay = Self.layout(size: size, opts: opts)
        l1Size = lay.l1Size
        l1Clusters = lay.l1Clusters
        l1Offset = cs
        dataLimit = min(lay.dataLimit, file.size)
        maxRefcount = opts.refcountOrder >= 6 ? UInt64.max : (UInt64(1) << (UInt64(1) << UInt64(opts.refcountOrder))) - 1
        compressors = Compressors(kind: opts.compression)
        decompressors = Decompressors(kind: opts.compression)
        state = Locked(State(l1: [Int64](repeating: 0, count: lay.l1Size), next: cs * Int64(1 + lay.l1Clusters)))
    }

    public var limits: BlockLimits {
        let compress = state.withLock { $0.compress }
        let align = opts.extendedL2 && !compress ? Int(cs / 32) : Int(cs)
        return BlockLimits(alignment: max(align, file.limits.alignment), preferredTransfer: max(Int(cs), 1 << 20),
                           maximumTransfer: 32 << 20)
    }

    public var capabilities: BlockCapabilities {
        var c: BlockCapabilities = [.write, .zero, .flush]
        if backing == nil { c.insert(.zeroInit) }
        return c
    }

    public var compressesWrites: Bool { state.withLock { $0.compress } }
    public func enableCompression() { state.withLock { $0.compress = true } }
    public var usedFileSize: Int64 { state.withLock { $0.used } }

    private func header(final: Bool, refcountTable: Int64, refcountClusters: Int) throws -> [UInt8] {
        var incompatible: UInt64 = opts.extendedL2 ? QCOW2Header.extendedL2Bit : 0
        if !final { incompatible |= QCOW2HeaderWriter.incompleteBit }
        let bitmaps = final ? state.withLock { $0.bitmaps } : nil
        return try QCOW2HeaderWriter.encode(.init(
            version: final ? opts.version : 3, clusterBits: opts.clusterBits, size: size, l1Size: l1Size,
            l1Offset: l1Size > 0 ? l1Offset : 0, refcountTableOffset: refcountTable, refcountTableClusters: refcountClusters,
            incompatible: incompatible, compatible: opts.lazyRefcounts ? QCOW2Header.lazyRefcountsBit : 0,
            refcountOrder: opts.refcountOrder, compression: opts.compression,
            backingFile: opts.backingFile, backingFormat: opts.backingFormat,
            autoclear: bitmaps == nil ? 0 : QCOW2Header.bitmapsBit, bitmaps: bitmaps))
    }

    /// Writes the incomplete header (the first thing written to a new image).
    func writeMarker() async throws {
        let h = try header(final: false, refcountTable: cs, refcountClusters: 1)
        try await writeHost(h, at: 0)
    }

    func writeHost(_ bytes: [UInt8], at offset: Int64) async throws {
        let buffer = AlignedBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.mutableBytes.copyMemory(from: $0) }
        try await writeHost(buffer.bytes, at: offset)
    }

    /// Writes a host run in pieces no larger than the file takes, sent together: on a file with
    /// a small maximum (NFS: 1 MiB) awaiting each piece in turn held the write turn for a round
    /// trip per piece. `issued`, if given, is called once every piece has been handed to the file.
    private func writeHost(_ bytes: UnsafeRawBufferPointer, at offset: Int64,
                           issued: (@Sendable () -> Void)? = nil) async throws {
        let step = max(file.limits.alignment, file.limits.maximumTransfer / file.limits.alignment * file.limits.alignment)
        try await file.writeInOrder(PendingWrite.pieces(bytes, at: offset, maximum: step), issued: issued ?? {})
    }

    // MARK: - allocation (inside the lock)

    private func full() -> FerryError {
        FerryError(.noSpace, "qcow2 image file is full (more data was written than the image can hold without reusing space)", path: name)
    }

    private func allocateCluster(_ s: inout State) throws -> Int64 {
        let pos = (s.next + cs - 1) / cs * cs
        guard pos + cs <= dataLimit else { throw full() }
        s.next = pos + cs
        return pos
    }

    /// `count` contiguous clusters for metadata other than tables (persistent bitmaps).
    func allocateMetadata(clusters count: Int64) throws -> Int64 {
        try state.withLock { s in
            let first = try allocateCluster(&s)
            for _ in 1 ..< max(1, count) { _ = try allocateCluster(&s) }
            s.bitmapClusters.append((first / cs, count))
            return first
        }
    }

    /// The bitmap directory the next commit's header points to.
    func setBitmaps(count: UInt32, directorySize: UInt64, directoryOffset: UInt64) {
        state.withLock { s in
            s.bitmaps = (count, directorySize, directoryOffset)
            s.bitmapsUnwritten = true
        }
    }

    private func ensureTable(_ s: inout State, _ i: Int) throws {
        if s.tables[i] == nil {
            s.l1[i] = try allocateCluster(&s)
            s.tables[i] = [UInt64](repeating: 0, count: opts.extendedL2 ? l2Entries * 2 : l2Entries)
        }
        s.dirty.insert(i)
    }

    /// Bytes for one compressed cluster of `length` bytes; where the refcount width could not
    /// count another user of the current cluster, a new cluster is started.
    private func allocateBytes(_ s: inout State, _ length: Int, align: Int64) throws -> Int64 {
        var pos = (s.next + align - 1) / align * align
        if pos % cs != 0 && (pos / cs != s.packCluster || s.packCount + 1 > maxRefcount) {
            pos = (pos + cs - 1) / cs * cs
        }
        let end = pos + Int64(length)
        guard end <= dataLimit else { throw full() }
        let first = pos / cs, last = (end - 1) / cs
        if first == s.packCluster && last == first { s.packCount += 1 } else { s.packCount = 1 }
        s.packCluster = last
        if last != first { s.packCount = 1 }
        s.next = (end + align - 1) / align * align
        return pos
    }

    // MARK: - the mapping of one cluster

    enum Decision { case host(Int64), slow, done }

    private func subMask(_ within: Int64, _ length: Int64) -> UInt64 {
        let sub = cs / 32
        let first = within / sub, last = (within + length - 1) / sub
        var m: UInt64 = 0
        for k in first ... last { m |= 1 << UInt64(k) }
        return m
    }

    /// Where a write of `length` bytes at `within` of guest cluster `c` goes, updating the
    /// mapping; `.slow` when the rest of the cluster must be read first.
    private func mapWrite(_ s: inout State, cluster c: Int64, within: Int64, length: Int64) throws -> Decision {
        let i = Int(c / Int64(l2Entries)), j = Int(c % Int64(l2Entries))
        let whole = within == 0 && (length == cs || (c << clusterBits) + length == size)
        try ensureTable(&s, i)
        var t = s.tables[i]!
        s.tables[i] = nil
        defer { s.tables[i] = t }
        if opts.extendedL2 {
            let sub = cs / 32
            let clusterEnd = min(cs, size - (c << clusterBits))
            let aligned = within % sub == 0 && ((within + length) % sub == 0 || within + length == clusterEnd)
            let d = t[2 * j]
            var host = Int64(d & Self.offsetMask)
            if d & Self.compressedBit != 0 {
                guard whole else { return .slow }
                host = 0
                t[2 * j + 1] = 0
            }
            guard aligned || whole else { return .slow }
            if host == 0 {
                host = try allocateCluster(&s)
                t[2 * j] = UInt64(host)
            }
            let m = whole ? 0xFFFF_FFFF : subMask(within, length)
            t[2 * j + 1] = (t[2 * j + 1] | m) & ~(m << 32)
            return .host(host + within)
        }
        let e = t[j]
        if e & Self.compressedBit != 0 {
            guard whole else { return .slow }
            let host = try allocateCluster(&s)
            t[j] = UInt64(host)
            return .host(host)
        }
        let host = Int64(e & Self.offsetMask)
        if host != 0 {
            if e & 1 != 0 {
                guard whole else { return .slow }
                t[j] = UInt64(host)
            }
            return .host(host + within)
        }
        // Unallocated, or zero without a place: a fresh cluster reads as zeros.
        let readsZero = e & 1 != 0 || backing == nil
        guard whole || readsZero else { return .slow }
        let h = try allocateCluster(&s)
        t[j] = UInt64(h)
        return .host(h + within)
    }

    /// Makes guest bytes `within ..< within + length` of cluster `c` read as zeros in the
    /// mapping, if that can be done there; `.slow` if zeros must be written.
    private func mapZero(_ s: inout State, cluster c: Int64, within: Int64, length: Int64, unmap: Bool) throws -> Decision {
        let i = Int(c / Int64(l2Entries)), j = Int(c % Int64(l2Entries))
        let whole = within == 0 && (length == cs || (c << clusterBits) + length == size)
        if s.tables[i] == nil && backing == nil { return .done }
        try ensureTable(&s, i)
        var t = s.tables[i]!
        s.tables[i] = nil
        defer { s.tables[i] = t }
        if opts.extendedL2 {
            let sub = cs / 32
            let clusterEnd = min(cs, size - (c << clusterBits))
            let aligned = within % sub == 0 && ((within + length) % sub == 0 || within + length == clusterEnd)
            let d = t[2 * j]
            if d & Self.compressedBit != 0 {
                guard whole else { return .slow }
                t[2 * j] = 0
                t[2 * j + 1] = 0xFFFF_FFFF << 32
                return .done
            }
            guard aligned || whole else { return .slow }
            let m = whole ? 0xFFFF_FFFF : subMask(within, length)
            if whole && unmap { t[2 * j] = 0 }
            t[2 * j + 1] = (t[2 * j + 1] & ~m) | (m << 32)
            return .done
        }
        let e = t[j]
        let host = e & Self.compressedBit != 0 ? 0 : Int64(e & Self.offsetMask)
        if opts.version >= 3 {
            if whole {
                t[j] = (unmap || host == 0) ? 1 : UInt64(host) | 1
                return .done
            }
            if (e & 1 != 0) || (e == 0 && backing == nil) { return .done }
            return .slow
        }
        // Version 2 has no zero flag: only an unallocated cluster without a backing file
        // reads as zeros.
        if backing == nil && (e == 0 || (whole && unmap)) {
            t[j] = 0
            return .done
        }
        return .slow
    }

    // MARK: - BlockDevice

    /// Puts the incomplete marker back before the first change after a commit.
    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await writeMarker() }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { return }
        try await beginChange()
        let n = Int64(buffer.count)
        if compressesWrites && offset % cs == 0 && (n % cs == 0 || offset + n == size) {
            let out = AlignedBuffer(count: buffer.count)
            let pieces = compress(buffer, at: offset, into: out.mutableBytes)
            try await writeCompressed(pieces, from: out.bytes)
            return
        }
        try await writePlain(at: offset, from: buffer)
        if flags.contains(.fua) { try await file.flush() }
    }

    /// Issued once the clusters are mapped and their data handed to the file: a later write
    /// allocates after this one and reaches the file after it, so the file keeps the guest
    /// order while the data writes of several requests overlap.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        guard !compressesWrites, !flags.contains(.fua) else {
            try await write(at: offset, from: buffer, flags: flags)
            issued()
            return
        }
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { issued(); return }
        try await beginChange()
        try await writePlain(at: offset, from: buffer, issued: issued)
    }

    /// Writes uncompressed: maps every cluster under one lock, then writes the host runs
    /// (joined where they continue each other) outside it; clusters that need their old
    /// contents first go through `rewrite`.
    /// `issued` is called once the last host run is handed to the file, or at the end when
    /// some cluster needs a read-modify-write (its old contents must not race a later write).
    private func writePlain(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                            issued: (@Sendable () -> Void)? = nil) async throws {
        let end = offset + Int64(buffer.count)
        var runs: [(host: Int64, from: Int, count: Int)] = []
        var slowOnes: [(at: Int64, from: Int, count: Int)] = []
        try state.withLock { s in
            var pos = offset
            while pos < end {
                let c = pos >> clusterBits
                let within = pos - (c << clusterBits)
                let n = min(end, (c + 1) << clusterBits) - pos
                let from = Int(pos - offset)
                switch try mapWrite(&s, cluster: c, within: within, length: n) {
                case .host(let h):
                    appendJoining(&runs, host: h, from: from, count: Int(n))
                case .slow: slowOnes.append((pos, from, Int(n)))
                case .done: break
                }
                pos += n
            }
        }
        let handOver = slowOnes.isEmpty ? issued : nil
        if runs.isEmpty { handOver?() }
        for (i, r) in runs.enumerated() {
            try await writeHost(UnsafeRawBufferPointer(rebasing: buffer[r.from ..< r.from + r.count]), at: r.host,
                                issued: i == runs.count - 1 ? handOver : nil)
        }
        for s in slowOnes {
            try await rewrite(at: s.at, with: UnsafeRawBufferPointer(rebasing: buffer[s.from ..< s.from + s.count]))
        }
        if !slowOnes.isEmpty { issued?() }
    }

    /// Read-modify-write of part of one cluster, one at a time.
    private func rewrite(at offset: Int64, with bytes: UnsafeRawBufferPointer) async throws {
        try await rewrite(at: offset, length: bytes.count) { $0.copyMemory(from: bytes) }
    }

    private func rewriteZeros(at offset: Int64, length: Int64) async throws {
        try await rewrite(at: offset, length: Int(length)) { $0.initializeMemory(as: UInt8.self, repeating: 0) }
    }

    /// Reads the cluster holding `offset`, lets `change` fill `length` bytes from there, and
    /// writes the cluster back.
    private func rewrite(at offset: Int64, length: Int, _ change: (UnsafeMutableRawBufferPointer) -> Void) async throws {
        await slow.lock()
        defer { slow.unlock() }
        let start = (offset >> clusterBits) << clusterBits
        let buffer = AlignedBuffer(count: Int(min(cs, size - start)))
        try await read(at: start, into: buffer.mutableBytes)
        let within = Int(offset - start)
        change(UnsafeMutableRawBufferPointer(rebasing: buffer.mutableBytes[within ..< within + length]))
        try await writePlain(at: start, from: buffer.bytes)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        try await beginChange()
        let end = offset + length
        var slowOnes: [(Int64, Int64)] = []
        try state.withLock { s in
            var pos = offset
            while pos < end {
                let c = pos >> clusterBits
                let within = pos - (c << clusterBits)
                let n = min(end, (c + 1) << clusterBits) - pos
                if case .slow = try mapZero(&s, cluster: c, within: within, length: n, unmap: flags.contains(.mayUnmap)) {
                    slowOnes.append((pos, n))
                }
                pos += n
            }
        }
        for (at, n) in slowOnes {
            if n == cs || at + n == size && at % cs == 0 {
                // A whole cluster that must hold real zeros (version 2 over a backing file).
                let zeros = AlignedBuffer(count: Int(n))
                zeros.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                try await writePlain(at: at, from: zeros.bytes)
            } else {
                try await rewriteZeros(at: at, length: n)
            }
        }
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func compress(_ data: UnsafeRawBufferPointer, at offset: Int64, into output: UnsafeMutableRawBufferPointer) -> [CompressedPiece] {
        precondition(offset % cs == 0 && output.count >= data.count)
        var pieces: [CompressedPiece] = []
        var from = 0, to = 0
        while from < data.count {
            let n = min(Int(cs), data.count - from)
            let input = UnsafeRawBufferPointer(rebasing: data[from ..< from + n])
            var done = false
            if n == Int(cs) || offset + Int64(from + n) == size {
                // A short last cluster is compressed padded with zeros to a whole cluster:
                // qemu wants every compressed cluster to inflate to exactly cluster_size.
                var padded: AlignedBuffer?
                if n < Int(cs) {
                    let p = AlignedBuffer(count: Int(cs))
                    p.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                    UnsafeMutableRawBufferPointer(rebasing: p.mutableBytes[0 ..< n]).copyMemory(from: input)
                    padded = p
                }
                // Must shrink by at least one byte to be worth storing compressed.
                if let c = compressors.compress(padded?.bytes ?? input, into: UnsafeMutableRawBufferPointer(rebasing: output[to ..< to + n - 1])), c > 0 {
                    pieces.append(CompressedPiece(guestOffset: offset + Int64(from), start: to, length: c, guestLength: n, compressed: true))
                    to += c
                    done = true
                }
            }
            if !done {
                UnsafeMutableRawBufferPointer(rebasing: output[to ..< to + n]).copyMemory(from: input)
                pieces.append(CompressedPiece(guestOffset: offset + Int64(from), start: to, length: n, guestLength: n, compressed: false))
                to += n
            }
            from += n
        }
        return pieces
    }

    public func writeCompressed(_ pieces: [CompressedPiece], from output: UnsafeRawBufferPointer) async throws {
        guard !pieces.isEmpty else { return }
        try await beginChange()
        let align = Int64(file.limits.alignment)
        var runs: [(host: Int64, from: Int, count: Int)] = []
        try state.withLock { s in
            for p in pieces where p.compressed {
                let c = p.guestOffset >> clusterBits
                let i = Int(c / Int64(l2Entries)), j = Int(c % Int64(l2Entries))
                try ensureTable(&s, i)
                let host = try allocateBytes(&s, p.length, align: align)
                let x = UInt64(62 - (clusterBits - 8))
                let sectors = UInt64((host + Int64(p.length) - 1) / 512 - host / 512)
                let entry = Self.compressedBit | (sectors << x) | UInt64(host)
                if opts.extendedL2 {
                    s.tables[i]![2 * j] = entry
                    s.tables[i]![2 * j + 1] = 0
                } else {
                    s.tables[i]![j] = entry
                }
                if align == 1, let last = runs.last, last.host + Int64(last.count) == host, last.from + last.count == p.start {
                    runs[runs.count - 1].count += p.length
                } else {
                    runs.append((host, p.start, p.length))
                }
            }
        }
        for r in runs {
            let bytes = UnsafeRawBufferPointer(rebasing: output[r.from ..< r.from + r.count])
            if align == 1 {
                try await writeHost(bytes, at: r.host)
            } else {
                let padded = AlignedBuffer(count: Int((Int64(r.count) + align - 1) / align * align))
                padded.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                UnsafeMutableRawBufferPointer(rebasing: padded.mutableBytes[0 ..< r.count]).copyMemory(from: bytes)
                try await writeHost(padded.bytes, at: r.host)
            }
        }
        for p in pieces where !p.compressed {
            try await writePlain(at: p.guestOffset, from: UnsafeRawBufferPointer(rebasing: output[p.start ..< p.start + p.length]))
        }
    }

    // MARK: - reading back

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        while pos < end {
            let c = pos >> clusterBits
            let start = c << clusterBits
            let n = min(end, start + cs) - pos
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(pos - offset + n)])
            let i = Int(c / Int64(l2Entries)), j = Int(c % Int64(l2Entries))
            let (d, bitmap): (UInt64, UInt64) = state.withLock { s in
                guard let t = s.tables[i] else { return (0, 0) }
                return opts.extendedL2 ? (t[2 * j], t[2 * j + 1]) : (t[j], 0)
            }
            try await readCluster(descriptor: d, bitmap: bitmap, clusterStart: start, at: pos, into: dst)
            pos += n
        }
    }

    private func readCluster(descriptor d: UInt64, bitmap: UInt64, clusterStart: Int64, at pos: Int64,
                             into dst: UnsafeMutableRawBufferPointer) async throws {
        let within = pos - clusterStart
        if d & Self.compressedBit != 0 {
            let x = UInt64(62 - (clusterBits - 8))
            let host = Int64(d & ((1 << x) - 1))
            let sectors = Int((d >> x) & ((1 << UInt64(clusterBits - 8)) - 1)) + 1
            let csize = sectors * 512 - Int(host & 511)
            let input = AlignedBuffer(count: csize)
            try await readHost(file, at: host, into: input.mutableBytes)
            let cluster = AlignedBuffer(count: Int(cs))
            guard decompressors.decompress(input.bytes, into: cluster.mutableBytes) else {
                throw FerryError(.corrupt, "compressed cluster at \(host) does not decompress", path: name, offset: clusterStart)
            }
            dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: cluster.bytes[Int(within) ..< Int(within) + dst.count]))
            return
        }
        let host = Int64(d & Self.offsetMask)
        if opts.extendedL2 {
            let sub = cs / 32
            var p = pos
            let end = pos + Int64(dst.count)
            while p < end {
                let k = (p - clusterStart) / sub
                let e = min(end, clusterStart + (k + 1) * sub)
                let part = UnsafeMutableRawBufferPointer(rebasing: dst[Int(p - pos) ..< Int(e - pos)])
                if bitmap & (1 << UInt64(k)) != 0 {
                    try await readHost(file, at: host + (p - clusterStart), into: part)
                } else if bitmap & (1 << UInt64(k + 32)) != 0 {
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                } else {
                    try await readBacking(at: p, into: part)
                }
                p = e
            }
            return
        }
        if d & 1 != 0 && opts.version >= 3 {
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        } else if host != 0 {
            try await readHost(file, at: host + within, into: dst)
        } else {
            try await readBacking(at: pos, into: dst)
        }
    }

    private func readBacking(at offset: Int64, into dst: UnsafeMutableRawBufferPointer) async throws {
        guard let backing, offset < backing.size else {
            dst.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let n = Int(min(Int64(dst.count), backing.size - offset))
        try await readHost(backing, at: offset, into: UnsafeMutableRawBufferPointer(rebasing: dst[0 ..< n]))
        if n < dst.count { UnsafeMutableRawBufferPointer(rebasing: dst[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try await extents(in: range)
    }

    // MARK: - commit

    public func flush() async throws {
        try await commit(durable: true)
    }

    public func commit(durable: Bool) async throws {
        // The mapping as it stands (writers have finished: the caller commits after them).
        let (l1, tables, dirty, next) = state.withLock { s in (s.l1, s.tables, s.dirty, s.next) }
        if !dirty.isEmpty || state.withLock({ $0.markerOnDisk || $0.bitmapsUnwritten }) {
            try await writeMetadata(l1: l1, tables: tables, dirty: dirty, next: next, durable: durable)
        } else if durable {
            try await file.flush()
        }
    }

    private func serialise(_ words: [UInt64], into buffer: UnsafeMutableRawBufferPointer, extended: Bool) {
        for (k, w) in words.enumerated() {
            var v = w
            let isDescriptor = !extended || k % 2 == 0
            if isDescriptor && v & Self.compressedBit == 0 && v & Self.offsetMask != 0 { v |= Self.copiedBit }
            buffer.storeBytes(of: v.bigEndian, toByteOffset: k * 8, as: UInt64.self)
        }
    }

    private func writeMetadata(l1: [Int64], tables: [Int: [UInt64]], dirty: Set<Int>, next: Int64, durable: Bool) async throws {
        let extended = opts.extendedL2
        let table = AlignedBuffer(count: Int(cs))
        for i in dirty.sorted() {
            guard let t = tables[i] else { continue }
            serialise(t, into: table.mutableBytes, extended: extended)
            try await writeHost(table.bytes, at: l1[i])
        }
        if l1Size > 0 {
            let l1Buffer = AlignedBuffer(count: l1Clusters * Int(cs))
            l1Buffer.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
            serialise(l1.map { UInt64($0) }, into: l1Buffer.mutableBytes, extended: false)
            try await writeHost(l1Buffer.bytes, at: l1Offset)
        }

        // Refcounts, from what the tables reference.
        let dataEnd = (next + cs - 1) / cs * cs
        let dataClusters = dataEnd / cs
        let region = Self.refcountRegion(clusters: dataClusters, clusterSize: cs, refcountOrder: opts.refcountOrder)
        let total = Int(dataClusters + region.blocks + region.table)
        var counts = [UInt64](repeating: 0, count: total)
        counts[0] = 1
        for k in 0 ..< l1Clusters { counts[1 + k] += 1 }
        let x = UInt64(62 - (clusterBits - 8))
        for (i, t) in tables {
            counts[Int(l1[i] / cs)] += 1
            let step = extended ? 2 : 1
            var k = 0
            while k < t.count {
                let d = t[k]
                if d & Self.compressedBit != 0 {
                    let host = Int64(d & ((1 << x) - 1))
                    let sectors = Int64((d >> x) & ((1 << UInt64(clusterBits - 8)) - 1)) + 1
                    let last = (host / 512 + sectors) * 512 - 1
                    for cl in host / cs ... last / cs { counts[Int(cl)] += 1 }
                } else if d & Self.offsetMask != 0 {
                    counts[Int(Int64(d & Self.offsetMask) / cs)] += 1
                }
                k += step
            }
        }
        for run in state.withLock({ $0.bitmapClusters }) {
            for c in run.first ..< run.first + run.count { counts[Int(c)] += 1 }
        }
        for k in Int(dataClusters) ..< total { counts[k] += 1 }
        if let over = counts.firstIndex(where: { $0 > maxRefcount }) {
            throw FerryError(.io, "internal error: host cluster \(over) would need refcount \(counts[over]), more than refcount_bits allows", path: name)
        }
        let bits = 1 << Int(opts.refcountOrder)
        let regionBytes = Int((region.blocks + region.table) * cs)
        let rc = AlignedBuffer(count: regionBytes)
        rc.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        let p = rc.mutableBytes
        for (k, v) in counts.enumerated() where v != 0 {
            switch bits {
            case 1, 2, 4:
                let bit = k * bits
                p[bit / 8] |= UInt8(truncatingIfNeeded: v << UInt64(bit % 8))
            case 8: p[k] = UInt8(truncatingIfNeeded: v)
            case 16: p.storeBytes(of: UInt16(truncatingIfNeeded: v).bigEndian, toByteOffset: k * 2, as: UInt16.self)
            case 32: p.storeBytes(of: UInt32(truncatingIfNeeded: v).bigEndian, toByteOffset: k * 4, as: UInt32.self)
            default: p.storeBytes(of: v.bigEndian, toByteOffset: k * 8, as: UInt64.self)
            }
        }
        let tableStart = Int(region.blocks * cs)
        for b in 0 ..< Int(region.blocks) {
            p.storeBytes(of: UInt64(dataEnd + Int64(b) * cs).bigEndian, toByteOffset: tableStart + b * 8, as: UInt64.self)
        }
        guard dataEnd + Int64(regionBytes) <= file.size else { throw full() }
        try await writeHost(rc.bytes, at: dataEnd)
        if durable { try await file.flush() }
        let h = try header(final: true, refcountTable: dataEnd + region.blocks * cs, refcountClusters: Int(region.table))
        try await writeHost(h, at: 0)
        if durable { try await file.flush() }
        let used = dataEnd + Int64(regionBytes)
        state.withLock { s in
            s.dirty.subtract(dirty)
            s.markerOnDisk = false
            s.bitmapsUnwritten = false
            s.used = used
            // Later allocations go past the refcount region (which becomes free space then).
            s.next = max(s.next, used)
        }
    }

    public func close() async throws {
        var firstError: (any Error)?
        do { try await file.close() } catch { firstError = error }
        if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
        if let firstError { throw firstError }
    }

    // MARK: - creation

    /// Lays out the image in `file` (the incomplete header first), preallocating as asked.
    static func create(name: String, file: any BlockDevice, size: Int64, opts: QCOW2CreateOptions,
                       backing: (any BlockDevice)?) async throws -> QCOW2Writer {
        let w = QCOW2Writer(name: name, file: file, size: size, opts: opts, backing: backing)
        try await w.writeMarker()
        if opts.preallocation != "off" {
            let clusters = (size + w.cs - 1) / w.cs
            let first = w.state.withLock { $0.next }
            try w.state.withLock { s in
                for c in 0 ..< clusters {
                    let n = min(w.cs, size - c * w.cs)
                    _ = try w.mapWrite(&s, cluster: c, within: 0, length: n)
                }
            }
            let last = w.state.withLock { $0.next }
            switch opts.preallocation {
            case "falloc":
                try await file.writeZeroes(at: first, length: last - first, flags: [])
            case "full":
                let chunk = AlignedBuffer(count: 1 << 20)
                chunk.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                var pos = first
                while pos < last {
                    let n = Int(min(Int64(chunk.count), last - pos))
                    try await file.write(at: pos, from: UnsafeRawBufferPointer(rebasing: chunk.bytes[0 ..< n]), flags: [])
                    pos += Int64(n)
                }
            default: break
            }
        }
        return w
    }
}
