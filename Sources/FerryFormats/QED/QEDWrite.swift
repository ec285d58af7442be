import FerryCore

/// The `-o` options of a new QED image, checked as qemu-img checks them.
struct QEDCreateOptions: Sendable {
    var clusterSize: Int64 = 64 << 10
    var tableSize: Int64 = 4
    var backingFile: String?
    var backingFormat: String?

    static func bad(_ what: String) -> FerryError { FerryError(.invalidArgument, what) }

    init(_ options: [String: String]) throws {
        if let cs = options["cluster_size"] {
            guard let v = ByteSize.parse(cs), v >= 4096, v <= 64 << 20, v & (v - 1) == 0 else {
                throw Self.bad("QED cluster size must be within range [4096, 67108864] and power of 2 (not '\(cs)')")
            }
            clusterSize = Int64(v)
        }
        if let ts = options["table_size"] {
            guard let v = Int64(ts), v >= 1, v <= 16, v & (v - 1) == 0 else {
                throw Self.bad("QED table size must be within range [1, 16] and power of 2 (not '\(ts)')")
            }
            tableSize = v
        }
        backingFile = options["backing_file"].flatMap { $0.isEmpty ? nil : $0 }
        backingFormat = options["backing_fmt"].flatMap { $0.isEmpty ? nil : $0 }
        if backingFormat != nil && backingFile == nil {
            throw Self.bad("a backing format was given without a backing file")
        }
        if let b = backingFile, b.utf8.count > 4096 {
            throw Self.bad("the backing file name is longer than 4096 bytes")
        }
    }

    var tableBytes: Int64 { tableSize * clusterSize }
    /// Guest bytes under one L2 table.
    var l2Span: Int64 { tableBytes / 8 * clusterSize }
    /// The largest image the two table levels address.
    var maxImageSize: Int64 { (tableBytes / 8) * l2Span }
    /// Header clusters: the 64-byte header and the backing file name after it.
    var headerClusters: Int64 { (Int64(QEDHeader.size) + Int64(backingFile?.utf8.count ?? 0) + clusterSize - 1) / clusterSize }
    var l1Offset: Int64 { headerClusters * clusterSize }

    /// The guest size as stored (qemu-img rounds it up to 512 bytes), checked against the tables.
    func imageSize(_ size: Int64) throws -> Int64 {
        let rounded = (size + 511) / 512 * 512
        guard rounded > 0, rounded <= maxImageSize else {
            throw Self.bad("QED image size must be a non-zero multiple of cluster size and less than \(maxImageSize) bytes")
        }
        return rounded
    }

    /// The file a new image may grow to: header, L1, every L2 table and every cluster.
    func fileLimit(_ size: Int64) throws -> Int64 {
        let image = try imageSize(size)
        let clusters = (image + clusterSize - 1) / clusterSize
        let tables = (image + l2Span - 1) / l2Span
        return l1Offset + tableBytes + tables * tableBytes + clusters * clusterSize
    }

    func header(imageSize: Int64) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: QEDHeader.size)
        func put32(_ at: Int, _ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { h.replaceSubrange(at ..< at + 4, with: $0) } }
        func put64(_ at: Int, _ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { h.replaceSubrange(at ..< at + 8, with: $0) } }
        h.replaceSubrange(0 ..< 4, with: QEDHeader.magic)
        put32(4, UInt32(clusterSize))
        put32(8, UInt32(tableSize))
        put32(12, UInt32(headerClusters))
        var features: UInt64 = 0
        if let b = backingFile {
            features |= QEDHeader.backingFileBit
            // qemu's "do not probe": the only format a QED header can name.
            if backingFormat == "raw" { features |= QEDHeader.backingFormatNoProbeBit }
            put32(56, UInt32(QEDHeader.size))
            put32(60, UInt32(b.utf8.count))
        }
        put64(16, features)
        put64(40, UInt64(l1Offset))
        put64(48, UInt64(imageSize))
        return h + Array((backingFile ?? "").utf8)
    }
}

/// A new QED image being written.
///
/// Header, L1 table, then data clusters and L2 tables taken by one bump pointer as data
/// arrives (a new L2 table after the clusters of the request that needs it). The tables live in memory and are
/// written at `commit`, the header last: until then the first sector is zeros, so an
/// interrupted copy is never read as a QED image. Every cluster taken is referenced, so the
/// file cut at `usedFileSize` has no leaks for `qemu-img check` to find.
final class QEDWriter: CommittingDevice, LayeredDevice, @unchecked Sendable {
    // @unchecked: the mutable state is behind `state`'s lock; the rest is immutable.
    let name: String
    let size: Int64
    let file: any BlockDevice
    let opts: QEDCreateOptions
    let backing: (any BlockDevice)?
    let cluster: Int64
    private let slow = AsyncMutex()

    struct Table {
        var host: Int64
        var entries: [UInt64]
    }

    struct State {
        var tables: [Int: Table] = [:]
        var next: Int64
        var dirty: Set<Int> = []
        var markerOnDisk = true
        var used: Int64 = 0
    }
    private let state: Locked<State>

    init(name: String, file: any BlockDevice, size: Int64, opts: QEDCreateOptions, backing: (any BlockDevice)?) {
        self.name = name
        self.file = file
        self.size = size
        self.opts = opts
        self.backing = backing
        self.cluster = opts.clusterSize
        state = Locked(State(next: opts.l1Offset + opts.tableBytes))
    }

    static func create(name: String, file: any BlockDevice, size: Int64, options: [String: String],
                       backing: (any BlockDevice)?) async throws -> QEDWriter {
        let opts = try QEDCreateOptions(options)
        let w = QEDWriter(name: name, file: file, size: try opts.imageSize(size), opts: opts, backing: backing)
        try await w.writeMarker()
        return w
    }

    var limits: BlockLimits {
        BlockLimits(alignment: max(file.limits.alignment, Int(cluster)), preferredTransfer: Int(max(cluster, 1 << 20)),
                    maximumTransfer: Int(max(cluster, 32 << 20)))
    }

    var capabilities: BlockCapabilities {
        backing == nil ? [.write, .flush, .zero, .zeroInit] : [.write, .flush, .zero]
    }

    var usedFileSize: Int64 { state.withLock { $0.used } }

    private func writeMarker() async throws {
        try await file.writePadded([UInt8](repeating: 0, count: 512), at: 0)
    }

    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await writeMarker() }
    }

    // MARK: - the mapping (inside the lock)

    private func take(_ s: inout State, _ bytes: Int64, at offset: Int64) throws -> Int64 {
        let at = s.next
        guard at + bytes <= file.size else {
            throw FerryError(.noSpace, "qed image file is full (\(file.size) bytes)", path: name, offset: offset)
        }
        s.next += bytes
        return at
    }

    private func index(_ offset: Int64) -> (l1: Int, l2: Int, within: Int64) {
        (Int(offset / opts.l2Span), Int(offset % opts.l2Span / cluster), offset % cluster)
    }

    private func entry(_ s: State, _ offset: Int64) -> UInt64 {
        let i = index(offset)
        return s.tables[i.l1]?.entries[i.l2] ?? 0
    }

    /// A table made here has no place yet (`host` -1) until `placeTables`.
    private func set(_ s: inout State, _ offset: Int64, _ value: UInt64) {
        let i = index(offset)
        if s.tables[i.l1] == nil {
            s.tables[i.l1] = Table(host: -1, entries: [UInt64](repeating: 0, count: Int(opts.tableBytes / 8)))
        }
        s.tables[i.l1]!.entries[i.l2] = value
        s.dirty.insert(i.l1)
    }

    /// New tables go after the clusters of the request under them: qemu's order, so that
    /// both writers lay out the same image.
    private func placeTables(_ s: inout State, at offset: Int64) throws {
        for (i, t) in s.tables where t.host < 0 {
            s.tables[i]!.host = try take(&s, opts.tableBytes, at: offset)
        }
    }

    private func allocate(_ s: inout State, _ offset: Int64) throws -> Int64 {
        let host = try take(&s, cluster, at: offset)
        set(&s, offset, UInt64(host))
        return host
    }

    enum Decision { case host(Int64), slow, done }

    private func isWhole(_ offset: Int64, _ length: Int64) -> Bool {
        offset % cluster == 0 && (length == cluster || offset + length == size)
    }

    /// Where `length` bytes at guest `offset` (within one cluster) go.
    private func mapWrite(_ s: inout State, at offset: Int64, length: Int64) throws -> Decision {
        let e = entry(s, offset)
        if e > QEDDevice.zeroCluster { return .host(Int64(e) + offset % cluster) }
        // A fresh cluster reads as zeros: enough unless the rest must come from the backing file.
        guard isWhole(offset, length) || e == QEDDevice.zeroCluster || backing == nil else { return .slow }
        return .host(try allocate(&s, offset) + offset % cluster)
    }

    /// How to make `length` bytes at guest `offset` (within one cluster) read as zeros.
    private func mapZero(_ s: inout State, at offset: Int64, length: Int64) throws -> Decision {
        let e = entry(s, offset)
        if e > QEDDevice.zeroCluster { return .host(Int64(e) + offset % cluster) }
        if e == QEDDevice.zeroCluster || backing == nil { return .done }
        guard isWhole(offset, length) else { return .slow }
        set(&s, offset, QEDDevice.zeroCluster)
        return .done
    }

    /// Runs `map` on every cluster piece of `offset ..< offset + length`: host runs (joined
    /// where they continue each other) and the pieces that need the slow path.
    private func plan(_ offset: Int64, _ length: Int64, _ map: (inout State, Int64, Int64) throws -> Decision) throws
        -> (runs: [(host: Int64, from: Int, count: Int)], slow: [(at: Int64, from: Int, count: Int)]) {
        var runs: [(host: Int64, from: Int, count: Int)] = []
        var slowOnes: [(at: Int64, from: Int, count: Int)] = []
        let end = offset + length
        try state.withLock { s in
            var pos = offset
            while pos < end {
                if pos % opts.l2Span == 0 { try placeTables(&s, at: pos) }
                let n = min(end, (pos / cluster + 1) * cluster) - pos
                let from = Int(pos - offset)
                switch try map(&s, pos, n) {
                case .host(let h):
                    appendJoining(&runs, host: h, from: from, count: Int(n))
                case .slow: slowOnes.append((pos, from, Int(n)))
                case .done: break
                }
                pos += n
            }
            try placeTables(&s, at: offset)
        }
        return (runs, slowOnes)
    }

    // MARK: - BlockDevice

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await write(at: offset, from: buffer, flags: flags, issued: {})
    }

    // Clusters are placed before the write is issued, so the writes of several requests
    // overlap in order instead of holding the write turn until each completes.
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
               issued: @escaping @Sendable () -> Void) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { issued(); return }
        try await beginChange()
        let (runs, slowOnes) = try plan(offset, Int64(buffer.count)) { s, at, n in try mapWrite(&s, at: at, length: n) }
        let pieces = runs.flatMap { r in
            PendingWrite.pieces(UnsafeRawBufferPointer(rebasing: buffer[r.from ..< r.from + r.count]), at: r.host,
                                maximum: file.limits.maximumTransfer)
        }
        try await file.writeInOrder(pieces, issued: issued)
        for p in slowOnes {
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[p.from ..< p.from + p.count])
            try await rewrite(at: p.at, length: p.count) { $0.copyMemory(from: bytes) }
        }
        if flags.contains(.fua) { try await flush() }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        try await beginChange()
        let (runs, slowOnes) = try plan(offset, length) { s, at, n in try mapZero(&s, at: at, length: n) }
        if flags.contains(.fastOnly) && !slowOnes.isEmpty {
            throw FerryError(.notSupported, "zeroing part of a qed cluster over a backing file writes zero bytes", path: name, offset: offset)
        }
        // An allocated cluster keeps its place: only its bytes become zeros.
        for r in runs { try await file.writeZeroes(at: r.host, length: Int64(r.count), flags: []) }
        for p in slowOnes {
            try await rewrite(at: p.at, length: p.count) { $0.initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }

    /// Read-modify-write of part of one cluster over a backing file, one at a time.
    private func rewrite(at offset: Int64, length: Int, _ change: (UnsafeMutableRawBufferPointer) -> Void) async throws {
        await slow.lock()
        defer { slow.unlock() }
        let start = offset / cluster * cluster
        let buffer = AlignedBuffer(count: Int(min(cluster, size - start)))
        try await read(at: start, into: buffer.mutableBytes)
        let within = Int(offset - start)
        change(UnsafeMutableRawBufferPointer(rebasing: buffer.mutableBytes[within ..< within + length]))
        let (runs, _) = try plan(start, Int64(buffer.count)) { s, at, n in try mapWrite(&s, at: at, length: n) }
        for r in runs {
            try await file.write(at: r.host, from: UnsafeRawBufferPointer(rebasing: buffer.bytes[r.from ..< r.from + r.count]), flags: [])
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        while pos < end {
            let n = min(end, (pos / cluster + 1) * cluster) - pos
            let e = state.withLock { entry($0, pos) }
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(pos - offset + n)])
            if e > QEDDevice.zeroCluster {
                try await file.read(at: Int64(e) + pos % cluster, into: dst)
            } else if e == 0 {
                try await readFromBacking(backing, at: pos, into: dst)
            } else {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            }
            pos += n
        }
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try await extents(in: range)
    }

    // MARK: - commit

    func flush() async throws { try await commit(durable: true) }

    func commit(durable: Bool) async throws {
        let (tables, dirty, next, marker) = state.withLock { s in (s.tables, s.dirty, s.next, s.markerOnDisk) }
        guard marker || !dirty.isEmpty else {
            if durable { try await file.flush() }
            return
        }
        for i in dirty.sorted() {
            guard let t = tables[i], t.host >= 0 else { continue }
            let buffer = AlignedBuffer(count: Int(opts.tableBytes))
            for (j, e) in t.entries.enumerated() {
                buffer.mutableBytes.storeBytes(of: e.littleEndian, toByteOffset: j * 8, as: UInt64.self)
            }
            try await file.writeInOrder(PendingWrite.pieces(buffer.bytes, at: t.host, maximum: file.limits.maximumTransfer), issued: {})
        }
        let l1 = AlignedBuffer(count: Int(opts.tableBytes))
        l1.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        for (i, t) in tables where t.host >= 0 {
            l1.mutableBytes.storeBytes(of: UInt64(t.host).littleEndian, toByteOffset: i * 8, as: UInt64.self)
        }
        try await file.writeInOrder(PendingWrite.pieces(l1.bytes, at: opts.l1Offset, maximum: file.limits.maximumTransfer), issued: {})
        if durable { try await file.flush() }
        // Last, what makes it a QED image: the header.
        try await file.writePadded(opts.header(imageSize: size), at: 0)
        if durable { try await file.flush() }
        state.withLock { s in
            s.dirty.subtract(dirty)
            if s.dirty.isEmpty { s.markerOnDisk = false }
            s.used = next
        }
    }

    func close() async throws { try await closeLayer(file: file, backing: backing) }
}
