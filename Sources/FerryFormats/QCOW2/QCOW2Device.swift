import FerryCore

/// The guest-visible device of a qcow2 image (read-only).
///
/// Metadata: the L1 table is read whole at open (its size is checked against the file); L2
/// tables come through a bounded `L2Cache`. Data reads run outside any lock, each request in
/// the task that asked for it; runs of clusters that are contiguous in the host file are read
/// with one call; compressed clusters are decompressed by the task that read them.
public final class QCOW2Device: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let backing: (any BlockDevice)?
    public let formatName = "qcow2"
    public let details: ImageDetails

    let header: QCOW2Header
    /// The qcow2 file (metadata, and data unless there is an external data file).
    let file: any BlockDevice
    /// Where guest clusters are stored: `file`, or the external data file.
    let dataDevice: any BlockDevice
    let externalData: (any BlockDevice)?
    let l1: [UInt64]
    let cache: L2Cache
    let decompressors: Decompressors
    let clusterSize: Int64
    let clusterBits: Int64

    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let compressedBit: UInt64 = 1 << 62
    static let copiedBit: UInt64 = 1 << 63

    init(name: String, header: QCOW2Header, file: any BlockDevice, externalData: (any BlockDevice)?,
         backing: (any BlockDevice)?, l1: [UInt64], details: ImageDetails) {
        self.name = name
        self.header = header
        self.size = header.size
        self.file = file
        self.externalData = externalData
        self.dataDevice = externalData ?? file
        self.backing = backing
        // Zero clusters read as a memset; the backing image's zero runs cost what it says.
        let cheapHoles = backing?.capabilities.contains(.cheapZeroReads) ?? true
        self.capabilities = cheapHoles ? [.extents, .cheapZeroReads] : [.extents]
        self.l1 = l1
        self.details = details
        self.clusterSize = Int64(header.clusterSize)
        self.clusterBits = Int64(header.clusterBits)
        self.decompressors = Decompressors(kind: QCOW2Compression(rawValue: header.compressionType) ?? .deflate)
        self.limits = BlockLimits(alignment: 1, preferredTransfer: max(header.clusterSize, 64 << 10), maximumTransfer: 32 << 20)
        // About 32 MiB of L2 tables: at least 16 of them, at most 1024.
        let capacity = max(16, min(1024, (32 << 20) / header.clusterSize))
        let cs = Int64(header.clusterSize)
        let fileName = name
        self.cache = L2Cache(capacity: capacity) { [file] offset in
            guard offset % cs == 0 else {
                throw FerryError(.corrupt, "qcow2 L1 entry points to an L2 table at \(offset), which is not aligned to a cluster", path: fileName, offset: offset)
            }
            guard offset <= file.size - cs else {
                throw FerryError(.corrupt, "qcow2 L2 table at \(offset) lies past the end of the file (\(file.size) bytes)", path: fileName, offset: offset)
            }
            let buffer = AlignedBuffer(count: Int(cs))
            try await readHost(file, at: offset, into: buffer.mutableBytes)
            let n = Int(cs) / 8
            var words = [UInt64](repeating: 0, count: n)
            for i in 0 ..< n {
                words[i] = UInt64(bigEndian: buffer.bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
            }
            return L2Table(words: words)
        }
    }

    // MARK: - the mapping

    enum RunKind: Equatable { case unallocated, zero, data, compressed }

    /// A run of guest bytes of one kind in this layer.
    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var kind: RunKind
        /// Host offset of `offset` (data, allocated zero), or of the compressed bytes.
        var host: Int64?
        /// Compressed clusters: bytes to read at `host`, and the guest cluster's start.
        var compressedSize: Int = 0
        var clusterStart: Int64 = 0
        var end: Int64 { offset + length }
        /// Compressed clusters stay apart: each is decompressed on its own.
        func joins(_ next: Run) -> Bool { kind == next.kind && next.kind != .compressed }
    }

    private func corrupt(_ what: String, _ offset: Int64) -> FerryError {
        FerryError(.corrupt, "qcow2 " + what, path: name, offset: offset)
    }

    /// This layer's runs from `range.lowerBound`, joined where they continue each other (in
    /// the guest and, for stored runs, in the host file); at most about `maxRuns` of them.
    func runs(in range: Range<Int64>, maxRuns: Int = 2048) async throws -> [Run] {
        var out: [Run] = []
        func append(_ r: Run) { out.appendJoining(r) }
        let coverage = header.l2Coverage
        let extended = header.extendedL2
        let version3 = header.version >= 3
        let hasDataFile = header.hasDataFile
        let l2Entries = Int64(header.l2Entries)
        var pos = range.lowerBound
        let end = min(range.upperBound, size)
        while pos < end && out.count < maxRuns {
            let l1Index = Int(pos / coverage)
            let tableEnd = min(end, Int64(l1Index + 1) * coverage)
            let l2Offset = Int64(l1[l1Index] & Self.offsetMask)
            if l2Offset == 0 {
                append(Run(offset: pos, length: tableEnd - pos, kind: .unallocated))
                pos = tableEnd
                continue
            }
            let table = try await cache.table(at: l2Offset)
            while pos < tableEnd && out.count < maxRuns {
                let cluster = pos >> clusterBits
                let index = Int(cluster % l2Entries)
                let clusterStart = cluster << clusterBits
                let clusterEnd = min(clusterStart + clusterSize, tableEnd)
                let entry = table.words[extended ? index * 2 : index]
                let guestAt = clusterStart
                if entry & Self.compressedBit != 0 {
                    if hasDataFile { throw corrupt("compressed cluster in an image with an external data file (L2 entry for guest offset \(guestAt))", l2Offset) }
                    let x = UInt64(62 - (clusterBits - 8))
                    let host = Int64(entry & ((1 << x) - 1))
                    let sectors = Int((entry >> x) & ((1 << UInt64(clusterBits - 8)) - 1)) + 1
                    let csize = sectors * 512 - Int(host & 511)
                    guard host > 0, host < file.size else {
                        throw corrupt("compressed cluster for guest offset \(guestAt) points to \(host), past the end of the file (\(file.size) bytes)", l2Offset)
                    }
                    append(Run(offset: pos, length: clusterEnd - pos, kind: .compressed, host: host,
                               compressedSize: csize, clusterStart: clusterStart))
                    pos = clusterEnd
                    continue
                }
                let host = Int64(entry & Self.offsetMask)
                let allocated = host != 0 || (hasDataFile && entry & Self.copiedBit != 0)
                if host % clusterSize != 0 {
                    throw corrupt("L2 entry for guest offset \(guestAt) points to \(host), which is not aligned to a cluster", l2Offset)
                }
                func checkHost() throws {
                    guard host < dataDevice.size else {
                        throw corrupt("L2 entry for guest offset \(guestAt) points to \(host), past the end of \(externalData == nil ? "the file" : "the data file") (\(dataDevice.size) bytes)", l2Offset)
                    }
                }
                if extended {
                    let bitmap = table.words[index * 2 + 1]
                    let alloc = UInt32(truncatingIfNeeded: bitmap)
                    let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
                    if alloc & zero != 0 { throw corrupt("subclusters of guest offset \(guestAt) are both allocated and zero", l2Offset) }
                    if alloc != 0 {
                        guard allocated else { throw corrupt("subclusters of guest offset \(guestAt) are allocated but the cluster has no host offset", l2Offset) }
                        try checkHost()
                    }
                    let sub = clusterSize / 32
                    var p = pos
                    while p < clusterEnd {
                        let si = Int((p - clusterStart) / sub)
                        let subEnd = min(clusterStart + Int64(si + 1) * sub, clusterEnd)
                        let within = p - clusterStart
                        if alloc & (1 << UInt32(si)) != 0 {
                            append(Run(offset: p, length: subEnd - p, kind: .data, host: host + within))
                        } else if zero & (1 << UInt32(si)) != 0 {
                            append(Run(offset: p, length: subEnd - p, kind: .zero, host: allocated ? host + within : nil))
                        } else {
                            // Unallocated in an allocated cluster: reads fall through, but the
                            // host place exists (qemu's map shows it where nothing is below).
                            append(Run(offset: p, length: subEnd - p, kind: .unallocated, host: allocated ? host + within : nil))
                        }
                        p = subEnd
                    }
                } else if version3 && entry & 1 != 0 {
                    append(Run(offset: pos, length: clusterEnd - pos, kind: .zero, host: allocated ? host + (pos - clusterStart) : nil))
                } else if allocated {
                    try checkHost()
                    append(Run(offset: pos, length: clusterEnd - pos, kind: .data, host: host + (pos - clusterStart)))
                } else {
                    append(Run(offset: pos, length: clusterEnd - pos, kind: .unallocated))
                }
                pos = clusterEnd
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
                throw corrupt("mapping does not cover guest offset \(pos)", pos)
            }
            var i = 0
            // Data runs are read together once the batch is walked: a request read across
            // holes (see the copy planner) has several, and in turn they cost a round trip each.
            var reads: [HostRead] = []
            while i < batch.count {
                let r = batch[i]
                func destination(_ r: Run) -> UnsafeMutableRawBufferPointer {
                    let n = Int(min(r.end, end) - r.offset)
                    let start = Int(r.offset - offset)
                    return UnsafeMutableRawBufferPointer(rebasing: buffer[start ..< start + n])
                }
                let dst = destination(r)
                switch r.kind {
                case .data:
                    reads.append(HostRead(device: dataDevice, host: r.host!, buffer: dst))
                case .zero:
                    dst.initializeMemory(as: UInt8.self, repeating: 0)
                case .unallocated:
                    try await readBacking(at: r.offset, into: dst)
                case .compressed:
                    // Compressed clusters written one after another lie one after another in
                    // the file: read the neighbours with one call, then decompress each.
                    var j = i + 1
                    var spanEnd = r.host! + Int64(r.compressedSize)
                    while j < batch.count, batch[j].kind == .compressed,
                          let h = batch[j].host, h >= r.host!, h <= spanEnd + 4096,
                          max(spanEnd, h + Int64(batch[j].compressedSize)) - r.host! <= Self.compressedSpan {
                        spanEnd = max(spanEnd, h + Int64(batch[j].compressedSize))
                        j += 1
                    }
                    let group = Array(batch[i ..< j])
                    try await readCompressed(group, span: r.host! ..< spanEnd) { destination($0) }
                    i = j - 1
                }
                pos = batch[i].offset + Int64(destination(batch[i]).count)
                i += 1
            }
            try await readTogether(reads)
        }
    }

    /// Most bytes read at once for a group of neighbouring compressed clusters.
    static let compressedSpan: Int64 = 4 << 20

    /// Reads from the backing image, zeros where there is none or where it ends.
    private func readBacking(at offset: Int64, into dst: UnsafeMutableRawBufferPointer) async throws {
        guard let backing, offset < backing.size else {
            dst.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let n = Int(min(Int64(dst.count), backing.size - offset))
        if backing is QCOW2Device {
            try await backing.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: dst[0 ..< n]))
        } else {
            try await readHost(backing, at: offset, into: UnsafeMutableRawBufferPointer(rebasing: dst[0 ..< n]))
        }
        if n < dst.count {
            UnsafeMutableRawBufferPointer(rebasing: dst[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Reads the compressed clusters `group` (lying within `span` of the file) with one call
    /// and decompresses them in this task.
    private func readCompressed(_ group: [Run], span: Range<Int64>,
                                destination: (Run) -> UnsafeMutableRawBufferPointer) async throws {
        let available = Int(max(0, min(span.upperBound, file.size) - span.lowerBound))
        let input = AlignedBuffer(count: max(available, 1))
        try await readHost(file, at: span.lowerBound, into: UnsafeMutableRawBufferPointer(rebasing: input.mutableBytes[0 ..< available]))
        var cluster: AlignedBuffer?
        for r in group {
            let dst = destination(r)
            let from = Int(r.host! - span.lowerBound)
            let to = min(available, from + r.compressedSize)
            let inBytes = UnsafeRawBufferPointer(rebasing: input.bytes[min(from, to) ..< to])
            let within = Int(r.offset - r.clusterStart)
            let ok: Bool
            if within == 0 && dst.count == Int(clusterSize) {
                ok = decompressors.decompress(inBytes, into: dst)
            } else {
                let c = cluster ?? AlignedBuffer(count: Int(clusterSize))
                cluster = c
                ok = decompressors.decompress(inBytes, into: c.mutableBytes)
                if ok { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: c.bytes[within ..< within + dst.count])) }
            }
            guard ok else {
                throw corrupt("compressed cluster for guest offset \(r.clusterStart) (\(r.compressedSize) bytes at \(r.host!)) does not decompress with \(decompressors.kind.infoName)", r.host!)
            }
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "qcow2 images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "qcow2 images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        var out: [Extent] = []
        for r in try await runs(in: range, maxRuns: 1024) {
            switch r.kind {
            case .data, .compressed: out.append(Extent(offset: r.offset, length: r.length, kind: .data))
            case .zero: out.append(Extent(offset: r.offset, length: r.length, kind: .zero))
            case .unallocated:
                guard let backing, r.offset < backing.size else {
                    out.append(Extent(offset: r.offset, length: r.length, kind: .unallocated))
                    continue
                }
                let bEnd = min(r.end, backing.size)
                try await backing.forEachExtent(in: r.offset ..< bEnd) { out.append($0) }
                if bEnd < r.end { out.append(Extent(offset: bEnd, length: r.end - bEnd, kind: .unallocated)) }
            }
        }
        return out.coalesced()
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        return try await runs(in: range, maxRuns: 1024).map { r in
            Extent(offset: r.offset, length: r.length,
                   kind: r.kind == .zero ? .zero : r.kind == .unallocated ? .unallocated : .data)
        }.coalesced()
    }

    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return try await runs(in: range, maxRuns: 1024).map { r in
            switch r.kind {
            case .data: return LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: r.host)
            case .compressed: return LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: nil)
            case .zero: return LayerMapping(offset: r.offset, length: r.length, kind: .zero, hostOffset: r.host)
            case .unallocated: return LayerMapping(offset: r.offset, length: r.length, kind: .unallocated, hostOffset: r.host)
            }
        }
    }

    public var hostFileName: String { dataDevice.name }

    /// How many L2 tables have been read from the file so far (for tests).
    public var l2TablesLoaded: Int { cache.loads }
    /// How many L2 tables are cached now, and how many may be (for tests).
    public var l2TablesCached: Int { cache.count }
    public var l2CacheCapacity: Int { cache.capacity }

    public func flush() async throws {}

    public func close() async throws {
        var firstError: (any Error)?
        do { try await file.close() } catch { firstError = error }
        if let externalData { do { try await externalData.close() } catch { firstError = firstError ?? error } }
        if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
        if let firstError { throw firstError }
    }
}

/// Reads `buffer.count` bytes of `device` at `offset`, keeping to the device's alignment
/// (through an aligned bounce buffer when the request is not aligned). Bytes past the end of
/// the device read as zeros, as they do for qemu.
func readHost(_ device: any BlockDevice, at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
    let available = Int(max(0, min(Int64(buffer.count), device.size - offset)))
    if available < buffer.count {
        UnsafeMutableRawBufferPointer(rebasing: buffer[available...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
    guard available > 0 else { return }
    let a = device.limits.alignment
    let maxChunk = max(a, device.limits.maximumTransfer / a * a)
    let aligned = a == 1 || (offset % Int64(a) == 0 && (available % a == 0 || offset + Int64(available) == device.size)
                             && Int(bitPattern: buffer.baseAddress) % a == 0)
    if aligned {
        var done = 0
        while done < available {
            let n = min(maxChunk, available - done)
            try await device.read(at: offset + Int64(done), into: UnsafeMutableRawBufferPointer(rebasing: buffer[done ..< done + n]))
            done += n
        }
        return
    }
    // Unaligned: read whole aligned blocks around the range (up to the device's end), a
    // bounded piece at a time.
    let a64 = Int64(a)
    var pos = offset
    let end = offset + Int64(available)
    let bounce = AlignedBuffer(count: min(maxChunk, 4 << 20) + a)
    while pos < end {
        let start = pos / a64 * a64
        let stop = min(min(end + a64 - 1, device.size + a64 - 1) / a64 * a64, start + Int64(bounce.count - a))
        let readEnd = min(stop, device.size)
        try await device.read(at: start, into: bounce.slice(0 ..< Int(readEnd - start)))
        let take = Int(min(end, readEnd) - pos)
        let from = Int(pos - start)
        let to = Int(pos - offset)
        UnsafeMutableRawBufferPointer(rebasing: buffer[to ..< to + take])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce.bytes[from ..< from + take]))
        pos += Int64(take)
    }
}
