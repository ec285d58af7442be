import FerryCore

/// The guest-visible device of a dmg image (read-only). The chunk list, sorted and checked to
/// cover the disk once, is built at open. Plain chunks are read in place (together, for a
/// request across several); zlib chunks are inflated whole, straight into the caller's
/// buffer when the request covers them; zero chunks are zeros.
final class DMGDevice: ReadOnlyFileDevice {
    let name: String
    let size: Int64
    let capabilities: BlockCapabilities = [.extents]
    let formatName = DMGFormat.name
    let details = DMGDevice.undescribed
    let file: any BlockDevice
    let chunks: [DMGLayout.Chunk]
    let inflaters = InflaterPool(windowBits: 15)

    init(name: String, file: any BlockDevice, size: Int64, chunks: [DMGLayout.Chunk]) {
        self.name = name
        self.file = file
        self.size = size
        self.chunks = chunks
    }

    /// The index of the chunk holding guest byte `offset` (the chunks cover the disk).
    func chunk(at offset: Int64) -> Int {
        var lo = 0, hi = chunks.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if chunks[mid].start <= offset { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }

    func inflate(_ c: DMGLayout.Chunk, into dst: UnsafeMutableRawBufferPointer) async throws {
        let compressed = AlignedBuffer(count: Int(c.length))
        try await readHost(file, at: c.host, into: compressed.mutableBytes)
        let n = inflaters.inflate(compressed.bytes, into: dst)
        guard n == dst.count else {
            let what = n.map { "inflates to \($0) of its \(dst.count) bytes" } ?? "is not a valid zlib stream"
            throw FerryError(.corrupt, "dmg zlib chunk of sector \(c.first) at file offset \(c.host) \(what)", path: name, offset: c.host)
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        var i = buffer.isEmpty ? 0 : chunk(at: offset)
        var reads: [HostRead] = []
        while pos < end {
            let c = chunks[i]
            let stop = min(c.end, end)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(stop - offset)])
            switch c.kind {
            case .zero:
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            case .raw:
                reads.append(HostRead(device: file, host: c.host + (pos - c.start), buffer: dst))
            case .zlib where pos == c.start && stop == c.end:
                try await inflate(c, into: dst)
            case .zlib:
                let whole = AlignedBuffer(count: Int(c.end - c.start))
                try await inflate(c, into: whole.mutableBytes)
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: whole.bytes[Int(pos - c.start) ..< Int(stop - c.start)]))
            case .unsupported(let method):
                throw FerryError(.notSupported, "dmg chunk of sector \(c.first) is compressed with \(method), which Ferry does not read",
                                 path: name, offset: pos)
            }
            pos = stop
            i += 1
        }
        try await readTogether(reads)
    }

    /// Zero chunks read as zeros; every other chunk is data.
    func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        var out: [Extent] = []
        var i = chunk(at: range.lowerBound)
        var pos = range.lowerBound
        while pos < range.upperBound && out.count < 1024 {
            let stop = min(chunks[i].end, range.upperBound)
            out.append(Extent(offset: pos, length: stop - pos, kind: chunks[i].kind == .zero ? .zero : .data))
            pos = stop
            i += 1
        }
        return out.coalesced()
    }

    func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try unplacedMapping(in: range)
    }
}
