import FerryCore

/// The guest-visible device of a VMDK image (read-only): its extents one after another.
///
/// Grain directories are read whole at open; grain tables come through each sparse extent's
/// bounded cache. Data reads run outside any lock, in the task that asked; grains that are
/// contiguous in their file are read with one call; neighbouring compressed grains are read
/// with one call and inflated one at a time, a grain wanted in part through a buffer of one
/// grain that the call owns (never more than the grain size, whatever a marker claims).
public final class VMDKReadDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let backing: (any BlockDevice)?
    public let formatName = "vmdk"
    public let details: ImageDetails
    /// The descriptor's content ID (an overlay names its parent's as parentCID).
    public let cid: UInt32

    let file: any BlockDevice
    let extents: [VMDKReadExtent]
    let cidMismatch: String?
    /// Grains are zlib streams (with the zlib header).
    let inflaters = InflaterPool(windowBits: 15)

    init(name: String, file: any BlockDevice, extents: [VMDKReadExtent], backing: (any BlockDevice)?, cid: UInt32,
         cidMismatch: String?, details: ImageDetails) {
        self.name = name
        self.file = file
        self.extents = extents
        self.size = extents.last?.end ?? 0
        self.backing = backing
        self.cid = cid
        self.cidMismatch = cidMismatch
        self.details = details
        // Holes and zero grains read as a memset, and holes in flat extent files cost what
        // the file says; a parent's cost what it says.
        var cheap = backing?.capabilities.contains(.cheapZeroReads) ?? true
        for e in extents where e.device != nil {
            if case .flat = e.kind, !(e.device!.capabilities.contains(.cheapZeroReads)) { cheap = false }
        }
        self.capabilities = cheap ? [.extents, .cheapZeroReads] : [.extents]
        var grain: Int64 = 64 << 10
        for e in extents { if case .sparse(let s) = e.kind { grain = max(grain, s.grainBytes) } }
        self.limits = BlockLimits(alignment: 1, preferredTransfer: Int(grain), maximumTransfer: 32 << 20)
    }

    // MARK: - the mapping

    enum RunKind: Equatable { case unallocated, zero, data, compressed }

    /// A run of guest bytes of one kind, within one extent.
    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var kind: RunKind
        var extent: Int
        /// Host offset of `offset` in the extent's file (data), or of the grain's marker.
        var host: Int64?
        /// Compressed grains: where the grain starts in its extent.
        var grainStart: Int64 = 0
        /// A flat extent's range that is a hole in its file: stored, but reads as zeros.
        var hole = false
        var end: Int64 { offset + length }
        /// Compressed grains stay apart: each is inflated on its own.
        func joins(_ next: Run) -> Bool {
            kind == next.kind && extent == next.extent && hole == next.hole && next.kind != .compressed
        }
    }

    private func extentIndex(_ pos: Int64) -> Int {
        var lo = 0, hi = extents.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if extents[mid].end <= pos { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    /// The runs from `range.lowerBound`, joined where they continue each other (in the guest
    /// and in the host file); at most about `maxRuns` of them. With `fileHoles`, flat extents
    /// ask their file where its holes are.
    func runs(in range: Range<Int64>, maxRuns: Int = 2048, fileHoles: Bool = false) async throws -> [Run] {
        var out: [Run] = []
        func append(_ r: Run) { out.appendJoining(r) }
        var pos = range.lowerBound
        let end = min(range.upperBound, size)
        var ei = extentIndex(pos)
        while pos < end && ei < extents.count && out.count < maxRuns {
            let ext = extents[ei]
            let extEnd = min(end, ext.end)
            switch ext.kind {
            case .zero:
                append(Run(offset: pos, length: extEnd - pos, kind: .zero, extent: ei))
                pos = extEnd
            case .flat(let base):
                let device = ext.device!
                let host = base + (pos - ext.start)
                let hostEnd = host + (extEnd - pos)
                guard fileHoles, device.capabilities.contains(.extents) else {
                    append(Run(offset: pos, length: extEnd - pos, kind: .data, extent: ei, host: host))
                    pos = extEnd
                    break
                }
                let fileEnd = min(hostEnd, device.size)
                var h = host
                if h < fileEnd {
                    for e in try await device.extents(in: h ..< fileEnd) {
                        guard e.offset == h, e.length > 0 else { break }
                        let stop = min(e.end, fileEnd)
                        append(Run(offset: ext.start + (h - base), length: stop - h, kind: .data, extent: ei, host: h, hole: e.kind != .data))
                        h = stop
                        if h >= fileEnd || out.count >= maxRuns { break }
                    }
                }
                // A file that answers nothing useful is data, all of it.
                if h == host && host < fileEnd {
                    append(Run(offset: pos, length: fileEnd - host, kind: .data, extent: ei, host: host))
                    h = fileEnd
                }
                // Past the end of a short file: reads as zeros.
                if h >= fileEnd && fileEnd < hostEnd {
                    append(Run(offset: ext.start + (h - base), length: hostEnd - h, kind: .data, extent: ei, host: h, hole: true))
                    h = hostEnd
                }
                pos = ext.start + (h - base)
            case .sparse(let s):
                var local = pos - ext.start
                let localEnd = extEnd - ext.start
                let coverage = s.grainBytes * s.tableEntries
                while local < localEnd && out.count < maxRuns {
                    let tableEnd = min(localEnd, (local / coverage + 1) * coverage)
                    guard let table = try await s.table(for: local), !table.empty else {
                        append(Run(offset: ext.start + local, length: tableEnd - local, kind: .unallocated, extent: ei))
                        local = tableEnd
                        continue
                    }
                    while local < tableEnd {
                        let grainStart = local / s.grainBytes * s.grainBytes
                        let grainEnd = min(grainStart + s.grainBytes, tableEnd)
                        let (kind, host) = try s.grain(table, at: local)
                        let at = ext.start + local
                        switch kind {
                        case .unallocated: append(Run(offset: at, length: grainEnd - local, kind: .unallocated, extent: ei))
                        case .zero: append(Run(offset: at, length: grainEnd - local, kind: .zero, extent: ei))
                        case .data: append(Run(offset: at, length: grainEnd - local, kind: .data, extent: ei, host: host + (local - grainStart)))
                        case .compressed:
                            append(Run(offset: at, length: grainEnd - local, kind: .compressed, extent: ei, host: host, grainStart: grainStart))
                        }
                        local = grainEnd
                    }
                }
                pos = ext.start + local
            }
            if pos >= ext.end { ei += 1 }
        }
        return out
    }

    // MARK: - BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        var grain: AlignedBuffer?
        while pos < end {
            let batch = try await runs(in: pos ..< end)
            guard let first = batch.first, first.offset == pos else {
                throw FerryError(.corrupt, "vmdk mapping does not cover guest offset \(pos)", path: name, offset: pos)
            }
            var reads: [HostRead] = []
            var i = 0
            while i < batch.count {
                let r = batch[i]
                let n = Int(min(r.end, end) - r.offset)
                let start = Int(r.offset - offset)
                let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[start ..< start + n])
                let ext = extents[r.extent]
                switch r.kind {
                case .data:
                    reads.append(HostRead(device: ext.device!, host: r.host!, buffer: dst))
                case .zero:
                    dst.initializeMemory(as: UInt8.self, repeating: 0)
                case .unallocated:
                    try await readBacking(at: r.offset, into: dst)
                case .compressed:
                    guard case .sparse(let s) = ext.kind else { break }
                    // A stream's grains lie one after another: read the neighbours with one
                    // call (up to the next grain's marker, 4 KiB past the last one), then
                    // inflate each.
                    var j = i + 1
                    var last = r.host!
                    while j < batch.count, batch[j].kind == .compressed, batch[j].extent == r.extent, batch[j].offset < end,
                          let h = batch[j].host, h > last, h - last <= Int64(s.maxCompressedBytes) + 512,
                          h + 4096 - r.host! <= Self.compressedSpan {
                        last = h
                        j += 1
                    }
                    let spanEnd = min(last + 4096, s.file.size)
                    let span = AlignedBuffer(count: Int(spanEnd - r.host!))
                    try await readHost(s.file, at: r.host!, into: span.mutableBytes)
                    for k in i ..< j {
                        let c = batch[k]
                        let cn = Int(min(c.end, end) - c.offset)
                        let cstart = Int(c.offset - offset)
                        let cdst = UnsafeMutableRawBufferPointer(rebasing: buffer[cstart ..< cstart + cn])
                        let ahead = UnsafeRawBufferPointer(rebasing: span.bytes[Int(c.host! - r.host!)...])
                        let needed = Int(min(s.grainBytes, ext.length - c.grainStart))
                        let within = Int(c.offset - ext.start - c.grainStart)
                        if within == 0 && cn == Int(s.grainBytes) {
                            try await s.readCompressed(marker: c.host!, grainStart: c.grainStart, ahead: ahead, into: cdst,
                                                       needed: needed, inflaters: inflaters)
                        } else {
                            if grain == nil || grain!.count < Int(s.grainBytes) { grain = AlignedBuffer(count: Int(s.grainBytes)) }
                            let out = grain!.slice(0 ..< Int(s.grainBytes))
                            try await s.readCompressed(marker: c.host!, grainStart: c.grainStart, ahead: ahead, into: out,
                                                       needed: needed, inflaters: inflaters)
                            cdst.copyMemory(from: UnsafeRawBufferPointer(rebasing: out[within ..< within + cn]))
                        }
                        pos = c.offset + Int64(cn)
                    }
                    i = j
                    continue
                }
                pos = r.offset + Int64(n)
                i += 1
            }
            try await readTogether(reads)
        }
    }

    /// Most bytes read at once for a run of neighbouring compressed grains.
    static let compressedSpan: Int64 = 1 << 20

    /// Reads from the parent, zeros where there is none or where it ends. As qemu-img does,
    /// a parent whose CID is not the one this image was made over cannot be read through.
    private func readBacking(at offset: Int64, into dst: UnsafeMutableRawBufferPointer) async throws {
        if let backing, offset < backing.size, let cidMismatch {
            throw FerryError(.corrupt, cidMismatch, path: name, offset: offset)
        }
        try await readFromBacking(backing, at: offset, into: dst)
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "existing vmdk images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "existing vmdk images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    private func kind(_ r: Run) -> ExtentKind {
        switch r.kind {
        case .data: return r.hole ? .zero : .data
        case .compressed: return .data
        case .zero: return .zero
        case .unallocated: return .unallocated
        }
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        var out: [Extent] = []
        for r in try await runs(in: range, maxRuns: 1024, fileHoles: true) {
            guard r.kind == .unallocated, let backing, r.offset < backing.size else {
                out.append(Extent(offset: r.offset, length: r.length, kind: kind(r)))
                continue
            }
            let bEnd = min(r.end, backing.size)
            try await backing.forEachExtent(in: r.offset ..< bEnd) { out.append($0) }
            if bEnd < r.end { out.append(Extent(offset: bEnd, length: r.end - bEnd, kind: .unallocated)) }
        }
        return out.coalesced()
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        return try await runs(in: range, maxRuns: 1024, fileHoles: true).map {
            Extent(offset: $0.offset, length: $0.length, kind: kind($0))
        }.coalesced()
    }

    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return try await runs(in: range, maxRuns: 1024, fileHoles: true).map { r in
            let ext = extents[r.extent]
            let hostFile = ext.device === file ? nil : ext.fileName
            switch r.kind {
            case .data:
                return LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: r.host, hostFile: hostFile,
                                    readsAsZero: r.hole)
            case .compressed: return LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: nil)
            case .zero: return LayerMapping(offset: r.offset, length: r.length, kind: .zero, hostOffset: nil)
            case .unallocated: return LayerMapping(offset: r.offset, length: r.length, kind: .unallocated, hostOffset: nil)
            }
        }
    }

    public var hostFileName: String { file.name }

    /// How many grain tables have been read so far, over all extents (for tests).
    public var grainTablesLoaded: Int {
        extents.reduce(0) { n, e in if case .sparse(let s) = e.kind { return n + s.cache.loads } else { return n } }
    }

    public func flush() async throws {}

    public func close() async throws {
        var firstError: (any Error)?
        do { try await file.close() } catch { firstError = error }
        for e in extents {
            guard let d = e.device, d !== file else { continue }
            do { try await d.close() } catch { firstError = firstError ?? error }
        }
        if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
        if let firstError { throw firstError }
    }
}
