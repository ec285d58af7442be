import FerryCore

/// The guest-visible device of a VHDX image (read-only).
///
/// The BAT is read whole at open; sector bitmaps of partially present blocks (differencing
/// images) are read for the sectors asked, on each call. Data reads run in parallel in the
/// task that asked; nothing is locked.
public final class VHDXReadDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits = BlockLimits()
    public let capabilities: BlockCapabilities
    public let backing: (any BlockDevice)?
    public let formatName = "vhdx"
    public let details: ImageDetails
    let file: any BlockDevice
    let parsed: VHDXParsed
    let bat: [UInt64]
    var dataWriteGuid: VHDXGUID { parsed.dataWriteGuid }

    init(name: String, file: any BlockDevice, parsed: VHDXParsed, bat: [UInt64], backing: (any BlockDevice)?, details: ImageDetails) {
        self.name = name
        self.file = file
        self.parsed = parsed
        self.bat = bat
        self.size = parsed.virtualSize
        self.backing = backing
        self.details = details
        self.capabilities = backing == nil ? [.extents, .cheapZeroReads] : [.extents]
    }

    enum Kind: Equatable { case data, zero, unallocated }
    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var kind: Kind
        var host: Int64?
        var end: Int64 { offset + length }
        func joins(_ next: Run) -> Bool { kind == next.kind }
    }

    /// The runs from `range.lowerBound` (at most about `maxRuns`), joined where they continue
    /// each other.
    func runs(in range: Range<Int64>, maxRuns: Int = 4096) async throws -> [Run] {
        var out: [Run] = []
        func append(_ r: Run) { out.appendJoining(r) }
        let bs = parsed.blockSize
        let cr = parsed.chunkRatio
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        while pos < end && out.count < maxRuns {
            let block = pos / bs
            let blockStart = block * bs
            let blockEnd = min(blockStart + bs, end)
            let index = Int(block + block / cr)
            let entry = bat[index]
            let state = entry & 7
            let host = Int64(entry >> 20) * VHDXLayout.mib
            let batAt = parsed.batOffset + Int64(index) * 8
            switch state {
            case VHDXLayout.notPresent:
                append(Run(offset: pos, length: blockEnd - pos, kind: .unallocated))
            case VHDXLayout.undefined, VHDXLayout.unmapped:
                append(Run(offset: pos, length: blockEnd - pos, kind: parsed.hasParent ? .zero : .unallocated))
            case VHDXLayout.zero:
                append(Run(offset: pos, length: blockEnd - pos, kind: .zero))
            case VHDXLayout.fullyPresent, VHDXLayout.partiallyPresent:
                let used = min(bs, size - blockStart)
                guard host >= VHDXLayout.mib, host <= file.size - used else {
                    throw FerryError(.corrupt, "vhdx BAT entry \(index) for guest offset \(blockStart) points to file offset \(host), past the end of the file (\(file.size) bytes)",
                                     path: name, offset: batAt)
                }
                if state == VHDXLayout.fullyPresent {
                    append(Run(offset: pos, length: blockEnd - pos, kind: .data, host: host + (pos - blockStart)))
                    break
                }
                guard parsed.hasParent else {
                    throw FerryError(.corrupt, "vhdx BAT entry \(index) is PARTIALLY_PRESENT in an image without a parent", path: name, offset: batAt)
                }
                // The chunk's sector bitmap: one bit per logical sector, from the chunk's start.
                let chunk = block / cr
                let sbIndex = Int(chunk * (cr + 1) + cr)
                let sb = bat[sbIndex]
                let sbHost = Int64(sb >> 20) * VHDXLayout.mib
                guard sb & 7 == VHDXLayout.bitmapPresent, sbHost >= VHDXLayout.mib, sbHost <= file.size - VHDXLayout.mib else {
                    throw FerryError(.corrupt, "vhdx sector bitmap BAT entry \(sbIndex) (state \(sb & 7), file offset \(sbHost)) is not a present block inside the file",
                                     path: name, offset: parsed.batOffset + Int64(sbIndex) * 8)
                }
                let ss = parsed.logicalSector
                let firstSector = (pos - chunk * cr * bs) / ss
                let lastSector = (blockEnd - 1 - chunk * cr * bs) / ss
                let byte0 = firstSector / 8
                let bits = try await vhdxReadBytes(file, at: sbHost + byte0, count: Int(lastSector / 8 - byte0 + 1))
                var p = pos
                while p < blockEnd {
                    let s = (p - chunk * cr * bs) / ss
                    let stop = min(blockEnd, (p / ss + 1) * ss)
                    let present = bits[Int(s / 8 - byte0)] >> UInt8(s % 8) & 1 != 0
                    append(present ? Run(offset: p, length: stop - p, kind: .data, host: host + (p - blockStart))
                                   : Run(offset: p, length: stop - p, kind: .unallocated))
                    p = stop
                }
            default:
                throw FerryError(.corrupt, "vhdx BAT entry \(index) has the invalid block state \(state)", path: name, offset: batAt)
            }
            pos = blockEnd
        }
        return out
    }

    // MARK: - BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await readMapped(at: offset, into: buffer, layer: name, format: "vhdx", file: file, backing: backing,
                             runs: { try await runs(in: $0) }) { r in
            switch r.kind {
            case .data: return .host(r.host!)
            case .zero: return .zeros
            case .unallocated: return .backing
            }
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "existing vhdx images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "existing vhdx images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    private static func kind(_ k: Kind) -> ExtentKind {
        switch k { case .data: return .data; case .zero: return .zero; case .unallocated: return .unallocated }
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        var out: [Extent] = []
        for r in try await runs(in: range, maxRuns: 1024) {
            guard r.kind == .unallocated, let backing, r.offset < backing.size else {
                out.append(Extent(offset: r.offset, length: r.length, kind: Self.kind(r.kind)))
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
        return try await runs(in: range, maxRuns: 1024).map { Extent(offset: $0.offset, length: $0.length, kind: Self.kind($0.kind)) }.coalesced()
    }

    /// As qemu-img 7.2 maps a vhdx (its driver tells no allocation): one data run over the
    /// whole image with no place in the file (so human `map` stops with an error, as there).
    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return [LayerMapping(offset: range.lowerBound, length: size - range.lowerBound, kind: .data, hostOffset: nil)]
    }

    public var hostFileName: String { file.name }

    public func flush() async throws {}

    public func close() async throws {
        var firstError: (any Error)?
        do { try await file.close() } catch { firstError = error }
        if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
        if let firstError { throw firstError }
    }
}
