import FerryCore

/// The guest-visible device of a VHD image (read-only).
///
/// The BAT is read whole at open (no larger than the file). Reads take what they need from
/// the BAT (immutable) and, for differencing disks, each block's sector bitmap; data is read
/// outside any lock, the pieces of one read in parallel.
public final class VHDReadDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let backing: (any BlockDevice)?
    public let formatName = "vpc"
    public let details: ImageDetails

    let file: any BlockDevice
    let type: VHDLayout.DiskType
    let blockSize: Int64
    let bitmapBytes: Int64
    let bat: [UInt32]

    init(name: String, file: any BlockDevice, type: VHDLayout.DiskType, size: Int64, blockSize: Int64, bat: [UInt32],
         backing: (any BlockDevice)?, details: ImageDetails) {
        self.name = name
        self.file = file
        self.type = type
        self.size = size
        self.blockSize = blockSize
        self.bitmapBytes = type == .fixed ? 0 : VHDLayout.bitmapBytes(blockSize: blockSize)
        self.bat = bat
        self.backing = backing
        self.details = details
        let cheap: Bool
        if type == .fixed { cheap = file.capabilities.contains(.cheapZeroReads) } else {
            cheap = backing?.capabilities.contains(.cheapZeroReads) ?? true
        }
        self.capabilities = cheap ? [.extents, .cheapZeroReads] : [.extents]
        self.limits = BlockLimits(alignment: 1, preferredTransfer: Int(max(blockSize, 1 << 20)), maximumTransfer: 32 << 20)
    }

    /// A run of guest bytes: in this image's file at `host` (`hole`: a hole in a fixed
    /// image's file), or not in this image (`host` nil).
    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var host: Int64?
        var hole = false
        var end: Int64 { offset + length }
        func joins(_ next: Run) -> Bool { hole == next.hole }
    }

    /// The runs from `range.lowerBound`, joined where they continue each other.
    func runs(in range: Range<Int64>, maxRuns: Int = 2048, fileHoles: Bool = false) async throws -> [Run] {
        var out: [Run] = []
        func append(_ r: Run) { out.appendJoining(r) }
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        if type == .fixed {
            guard fileHoles, file.capabilities.contains(.extents), pos < end else {
                append(Run(offset: pos, length: end - pos, host: pos))
                return out
            }
            let fileEnd = min(end, file.size)
            if pos < fileEnd {
                for e in try await file.extents(in: pos ..< fileEnd) {
                    guard e.offset == pos, e.length > 0 else { break }
                    let stop = min(e.end, fileEnd)
                    append(Run(offset: pos, length: stop - pos, host: pos, hole: e.kind != .data))
                    pos = stop
                    if pos >= fileEnd || out.count >= maxRuns { break }
                }
            }
            if out.isEmpty && pos < fileEnd { append(Run(offset: pos, length: fileEnd - pos, host: pos)) }
            // Past the end of the file: zeros.
            if pos >= fileEnd && pos < end { append(Run(offset: pos, length: end - pos, host: pos, hole: true)) }
            return out
        }
        while pos < end && out.count < maxRuns {
            let b = Int(pos / blockSize)
            let blockStart = Int64(b) * blockSize
            let stop = min(end, blockStart + blockSize)
            let entry = bat[b]
            if entry == VHDLayout.unallocated {
                append(Run(offset: pos, length: stop - pos, host: nil))
            } else {
                let base = Int64(entry) * VHDLayout.sector
                let data = base + bitmapBytes
                if type == .dynamic {
                    append(Run(offset: pos, length: stop - pos, host: data + (pos - blockStart)))
                } else {
                    // Differencing: the bitmap says which sectors are here (bit 7 of byte 0 is
                    // the block's first sector).
                    let first = (pos - blockStart) / VHDLayout.sector
                    let last = (stop - blockStart + VHDLayout.sector - 1) / VHDLayout.sector
                    let from = first / 8, to = (last + 7) / 8
                    let bits = try await VHDReader.readBytes(file, at: base + from, count: Int(to - from))
                    var p = pos
                    for s in first ..< last {
                        let byte = bits[Int(s / 8 - from)]
                        let here = byte & (0x80 >> UInt8(s % 8)) != 0
                        let sEnd = min(stop, blockStart + (s + 1) * VHDLayout.sector)
                        append(Run(offset: p, length: sEnd - p, host: here ? data + (p - blockStart) : nil))
                        p = sEnd
                    }
                }
            }
            pos = stop
        }
        return out
    }

    // MARK: - BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await readMapped(at: offset, into: buffer, layer: name, format: "vhd", file: file, backing: backing,
                             runs: { try await runs(in: $0) }, source: { r in r.host.map { .host($0) } ?? .backing })
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "existing vpc images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "existing vpc images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        var out: [Extent] = []
        for r in try await runs(in: range, maxRuns: 1024, fileHoles: true) {
            if r.host != nil {
                out.append(Extent(offset: r.offset, length: r.length, kind: r.hole ? .zero : .data))
                continue
            }
            guard let backing, r.offset < backing.size else {
                out.append(Extent(offset: r.offset, length: r.length, kind: .unallocated))
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
            Extent(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : ($0.hole ? .zero : .data))
        }.coalesced()
    }

    /// As qemu-img 7.2 maps a VHD: allocated blocks are data (whole blocks, without asking the
    /// file), blocks a dynamic disk leaves out read as zeros; a fixed disk is its file.
    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return try await runs(in: range, maxRuns: 1024, fileHoles: type == .fixed).map { r in
            if let host = r.host {
                return LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: host, readsAsZero: r.hole)
            }
            return LayerMapping(offset: r.offset, length: r.length, kind: type == .differencing ? .unallocated : .zero, hostOffset: nil)
        }
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
