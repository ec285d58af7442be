import FerryCore

/// The guest-visible device of a Bochs growing image (read-only). The catalog is read at
/// open; the sector bitmaps of the extents a request touches are read with the request.
/// Sectors written one after another are read with one request; nothing is locked.
public final class BochsDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits = BlockLimits()
    public let capabilities: BlockCapabilities = [.extents, .cheapZeroReads]
    public let backing: (any BlockDevice)? = nil
    public let formatName = BochsFormat.name
    public let details: ImageDetails
    let file: any BlockDevice
    let extentSize: Int64
    let bitmapSize: Int64
    /// Where each extent (its bitmap, then its sectors) is in the file, -1 for none.
    let hosts: [Int64]
    static let sector: Int64 = 512

    init(name: String, file: any BlockDevice, size: Int64, extentSize: Int64, bitmapSize: Int64, hosts: [Int64]) {
        self.name = name
        self.file = file
        self.size = size
        self.extentSize = extentSize
        self.bitmapSize = bitmapSize
        self.hosts = hosts
        var d = ImageDetails()
        // qemu-img 7.2 shows neither a cluster size nor a dirty flag for bochs images.
        d.dirtyKnown = false
        self.details = d
    }

    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var host: Int64?
        var end: Int64 { offset + length }
        func joins(_ next: Run) -> Bool { (host == nil) == (next.host == nil) }
    }

    /// The runs from `range.lowerBound` (at most about `maxRuns`): written sectors at their
    /// place in the file, the others holes.
    func runs(in range: Range<Int64>, maxRuns: Int = 4096) async throws -> [Run] {
        var out: [Run] = []
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        while pos < end && out.count < maxRuns {
            let index = pos / extentSize
            let start = index * extentSize
            let stop = min(start + extentSize, end)
            let host = hosts[Int(index)]
            guard host >= 0 else {
                out.appendJoining(Run(offset: pos, length: stop - pos, host: nil))
                pos = stop
                continue
            }
            let first = (pos - start) / Self.sector, last = (stop - 1 - start) / Self.sector
            let bits = try await vhdxReadBytes(file, at: host + first / 8, count: Int(last / 8 - first / 8 + 1))
            var p = pos
            while p < stop {
                let s = (p - start) / Self.sector
                let next = min(stop, start + (s + 1) * Self.sector)
                let written = bits[Int(s / 8 - first / 8)] >> UInt8(s % 8) & 1 != 0
                out.appendJoining(Run(offset: p, length: next - p, host: written ? host + bitmapSize + (p - start) : nil))
                p = next
            }
            pos = stop
        }
        return out
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        while pos < end {
            var reads: [HostRead] = []
            for r in try await runs(in: pos ..< end) {
                let start = Int(r.offset - offset)
                let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[start ..< start + Int(r.length)])
                if let host = r.host {
                    reads.append(HostRead(device: file, host: host, buffer: dst))
                } else {
                    dst.initializeMemory(as: UInt8.self, repeating: 0)
                }
                pos = r.end
            }
            try await readTogether(reads)
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw readOnlyFormatError(formatName, name, offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw readOnlyFormatError(formatName, name, offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await layerExtents(in: range)
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        return try await runs(in: range, maxRuns: 1024).map {
            Extent(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : .data)
        }.coalesced()
    }

    /// As qemu-img 7.2 maps a bochs image (its driver tells no allocation): one data run with
    /// no place in the file, so human `map` stops with an error, as there.
    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return [LayerMapping(offset: range.lowerBound, length: size - range.lowerBound, kind: .data, hostOffset: nil)]
    }

    public var hostFileName: String { file.name }

    public func flush() async throws {}

    public func close() async throws { try await file.close() }
}
