import FerryCore

/// The guest-visible device of a cloop image (read-only). Each block read is inflated on its
/// own, straight into the caller's buffer when the request covers it whole; concurrent reads
/// inflate in parallel (one inflater each, from a pool). Nothing else is shared.
final class CloopDevice: ReadOnlyFileDevice {
    let name: String
    let size: Int64
    let capabilities: BlockCapabilities = [.extents]
    let formatName = CloopFormat.name
    let details = CloopDevice.undescribed
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
    }

    /// Inflates block `index` into `dst` (`blockSize` bytes).
    func inflate(block index: Int, into dst: UnsafeMutableRawBufferPointer) async throws {
        let from = offsets[index]
        let compressed = AlignedBuffer(count: Int(offsets[index + 1] - from))
        try await readHost(file, at: from, into: compressed.mutableBytes)
        let n = inflaters.inflate(compressed.bytes, into: dst)
        guard n == dst.count else {
            let what = n.map { "inflates to \($0) of its \(dst.count) bytes" } ?? "is not a valid zlib stream"
            throw FerryError(.corrupt, "cloop block \(index) at file offset \(from) \(what)", path: name, offset: from)
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
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

    /// Every block holds data (the format has no holes).
    func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return [Extent(offset: range.lowerBound, length: range.upperBound - range.lowerBound, kind: range.isEmpty ? .unallocated : .data)]
    }

    func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try unplacedMapping(in: range)
    }
}
