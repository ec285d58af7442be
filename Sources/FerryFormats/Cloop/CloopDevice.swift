import FerryCore

/// The guest-visible device of a cloop image (read-only). Each block read is inflated on its
/// own, straight into the caller's buffer when the request covers it whole; concurrent reads
/// inflate in parallel (one inflater each, from a pool). Nothing else is shared.
public final class CloopDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits = BlockLimits()
    public let capabilities: BlockCapabilities = [.extents]
    public let backing: (any BlockDevice)? = nil
    public let formatName = CloopFormat.name
    public let details: ImageDetails
    let file: any BlockDevice
    let blockSize: Int64
    /// Where each block's stream starts in the file, and (last) where the last one ends.
    let offsets: [Int64]
    let inflaters = InflaterPool(windowBits: 15)

    init(name: String, file: any BlockDevice, blockSize: Int64, offsets: [Int64]) {
        self.name = name
        self.file = file
        self.blockSize = blockSize
        self.offsets = offsets
        self.size = Int64(offsets.count - 1) * blockSize
        var d = ImageDetails()
        // qemu-img 7.2 shows neither a cluster size nor a dirty flag for cloop images.
        d.dirtyKnown = false
        self.details = d
    }

    /// Inflates block `index` into `dst` (`blockSize` bytes).
    func inflate(block index: Int, into dst: UnsafeMutableRawBufferPointer) async throws {
        let from = offsets[index], length = Int(offsets[index + 1] - from)
        let compressed = AlignedBuffer(count: length)
        try await readHost(file, at: from, into: compressed.mutableBytes)
        guard let n = inflaters.inflate(compressed.bytes, into: dst) else {
            throw FerryError(.corrupt, "cloop block \(index) at file offset \(from) is not a valid zlib stream", path: name, offset: from)
        }
        guard n == dst.count else {
            throw FerryError(.corrupt, "cloop block \(index) at file offset \(from) inflates to \(n) of its \(dst.count) bytes", path: name, offset: from)
        }
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        var scratch: AlignedBuffer?
        while pos < end {
            let block = pos / blockSize
            let start = block * blockSize
            let stop = min(start + blockSize, end)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(stop - offset)])
            if pos == start && stop == start + blockSize {
                try await inflate(block: Int(block), into: dst)
            } else {
                let s = scratch ?? AlignedBuffer(count: Int(blockSize))
                scratch = s
                try await inflate(block: Int(block), into: s.mutableBytes)
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: s.bytes[Int(pos - start) ..< Int(stop - start)]))
            }
            pos = stop
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw readOnlyFormatError(formatName, name, offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw readOnlyFormatError(formatName, name, offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    /// Every block holds data (the format has no holes).
    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await layerExtents(in: range)
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return [Extent(offset: range.lowerBound, length: range.upperBound - range.lowerBound, kind: range.isEmpty ? .unallocated : .data)]
    }

    /// As qemu-img 7.2 maps a cloop image: one data run with no place in the file (its blocks
    /// are compressed), so human `map` stops with an error, as there.
    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return [LayerMapping(offset: range.lowerBound, length: size - range.lowerBound, kind: .data, hostOffset: nil)]
    }

    public var hostFileName: String { file.name }

    public func flush() async throws {}

    public func close() async throws { try await file.close() }
}
