import FerryCore

/// The guest-visible device of a QED image (read-only).
///
/// The L1 table is read whole at open (its offset and size checked against the file); L2
/// tables through a bounded `L2Cache`, each entry checked when the table is loaded. Data runs
/// that continue each other in the file are read with one call, the runs of one read in
/// parallel; nothing holds a lock across I/O.
public final class QEDDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let backing: (any BlockDevice)?
    public let formatName = "qed"
    public let details: ImageDetails

    let file: any BlockDevice
    let header: QEDHeader
    let l1: [UInt64]
    let cache: L2Cache

    /// An L2 entry meaning "reads as zeros" (0 means unallocated).
    static let zeroCluster: UInt64 = 1

    init(name: String, file: any BlockDevice, header: QEDHeader, l1: [UInt64], backing: (any BlockDevice)?, details: ImageDetails) {
        self.name = name
        self.file = file
        self.header = header
        self.size = header.imageSize
        self.l1 = l1
        self.backing = backing
        self.details = details
        let cheap = backing?.capabilities.contains(.cheapZeroReads) ?? true
        self.capabilities = cheap ? [.extents, .cheapZeroReads] : [.extents]
        self.limits = BlockLimits(alignment: 1, preferredTransfer: Int(max(header.clusterSize, 1 << 20)), maximumTransfer: 32 << 20)
        let tableBytes = header.tableBytes, clusterSize = header.clusterSize
        let fileSize = file.size
        self.cache = L2Cache(capacity: Int(max(4, (64 << 20) / tableBytes))) { [file] offset in
            let raw = try await QEDFormat.bytes(file, at: offset, count: Int(tableBytes))
            let words = Self.entries(raw)
            for (i, w) in words.enumerated() where w > Self.zeroCluster {
                guard w % UInt64(clusterSize) == 0, w < UInt64(fileSize) else {
                    throw FerryError(.corrupt, "qed L2 table at \(offset): entry \(i) (\(w)) is not cluster-aligned or lies past the end of the file (\(fileSize) bytes)",
                                     path: name, offset: offset + Int64(i) * 8)
                }
            }
            return L2Table(words: words)
        }
    }

    /// Little-endian 64-bit table entries.
    static func entries(_ raw: [UInt8]) -> [UInt64] {
        raw.withUnsafeBytes { p in
            (0 ..< p.count / 8).map { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self)) }
        }
    }

    enum Kind { case data, zero, unallocated }

    /// A run of guest bytes: in this image's file at `host`, a zero cluster, or unallocated.
    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var host: Int64?
        var kind: Kind
        var end: Int64 { offset + length }
        func joins(_ next: Run) -> Bool { kind == next.kind }
    }

    /// The runs from `range.lowerBound`, joined where they continue each other.
    func runs(in range: Range<Int64>, maxRuns: Int = 2048) async throws -> [Run] {
        var out: [Run] = []
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        let cluster = header.clusterSize
        let l2Span = header.tableEntries * cluster
        while pos < end && out.count < maxRuns {
            let i1 = Int(pos / l2Span)
            let spanEnd = min(end, Int64(i1 + 1) * l2Span)
            let l2Offset = l1[i1]
            if l2Offset == 0 {
                out.appendJoining(Run(offset: pos, length: spanEnd - pos, host: nil, kind: .unallocated))
                pos = spanEnd
                continue
            }
            guard l2Offset % UInt64(cluster) == 0, l2Offset < UInt64(file.size),
                  UInt64(file.size) - l2Offset >= UInt64(header.tableBytes) else {
                throw FerryError(.corrupt, "qed L1 entry \(i1) (\(l2Offset)) is not cluster-aligned or its L2 table lies past the end of the file (\(file.size) bytes)",
                                 path: name, offset: header.l1TableOffset + Int64(i1) * 8)
            }
            let table = try await cache.table(at: Int64(l2Offset))
            while pos < spanEnd && out.count < maxRuns {
                let within = pos - Int64(i1) * l2Span
                let i2 = Int(within / cluster)
                let stop = min(spanEnd, pos - within % cluster + cluster)
                let e = table.words[i2]
                switch e {
                case 0: out.appendJoining(Run(offset: pos, length: stop - pos, host: nil, kind: .unallocated))
                case Self.zeroCluster: out.appendJoining(Run(offset: pos, length: stop - pos, host: nil, kind: .zero))
                default: out.appendJoining(Run(offset: pos, length: stop - pos, host: Int64(e) + within % cluster, kind: .data))
                }
                pos = stop
            }
        }
        return out
    }

    // MARK: - BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        while pos < end {
            let batch = try await runs(in: pos ..< end)
            guard let first = batch.first, first.offset == pos else {
                throw FerryError(.corrupt, "qed mapping does not cover guest offset \(pos)", path: name, offset: pos)
            }
            var reads: [HostRead] = []
            var fallThrough: [(Int64, UnsafeMutableRawBufferPointer)] = []
            for r in batch {
                let start = Int(r.offset - offset)
                let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[start ..< start + Int(r.length)])
                switch r.kind {
                case .data: reads.append(HostRead(device: file, host: r.host ?? 0, buffer: dst))
                case .zero: dst.initializeMemory(as: UInt8.self, repeating: 0)
                case .unallocated: fallThrough.append((r.offset, dst))
                }
                pos = r.end
            }
            try await readTogether(reads)
            for (at, dst) in fallThrough { try await readFromBacking(backing, at: at, into: dst) }
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "existing qed images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "existing qed images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        var out: [Extent] = []
        for r in try await runs(in: range, maxRuns: 1024) {
            switch r.kind {
            case .data: out.append(Extent(offset: r.offset, length: r.length, kind: .data))
            case .zero: out.append(Extent(offset: r.offset, length: r.length, kind: .zero))
            case .unallocated: try await appendFallThroughExtents(r.offset ..< r.end, backing: backing, to: &out)
            }
        }
        return out.coalesced()
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try await layerMapping(in: range).map { Extent(offset: $0.offset, length: $0.length, kind: $0.kind) }.coalesced()
    }

    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return try await runs(in: range, maxRuns: 1024).map { r in
            switch r.kind {
            case .data: return LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: r.host)
            case .zero: return LayerMapping(offset: r.offset, length: r.length, kind: .zero, hostOffset: nil)
            case .unallocated: return LayerMapping(offset: r.offset, length: r.length, kind: .unallocated, hostOffset: nil)
            }
        }
    }

    public var hostFileName: String { file.name }

    public func flush() async throws {}

    public func close() async throws { try await closeLayer(file: file, backing: backing) }
}
