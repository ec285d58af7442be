import FerryCore

/// Opens VDI 1.1 images, normal (dynamic) or fixed: the header, then the block map, read
/// whole (never larger than the file), each entry checked.
enum VDIReader {
    /// `checking`: the block map's entries are kept as they are (out of range or not), for
    /// `check` to report.
    static func open(file: any BlockDevice, context: FormatContext, checking: Bool = false) async throws -> VDIReadDevice {
        let name = context.location
        guard file.size >= Int64(VDILayout.headerEnd) else {
            throw FerryError(.corrupt, "vdi image is truncated: \(file.size) bytes cannot hold its \(VDILayout.headerEnd)-byte header", path: name, offset: 0)
        }
        let hb = AlignedBuffer(count: 512)
        try await readHost(file, at: 0, into: hb.slice(0 ..< 512))
        let h = hb.bytes
        guard VDILayout.le32(h, 0x40) == VDILayout.signature else {
            throw FerryError(.corrupt, "no vdi signature (0xbeda107f) at offset 0x40", path: name, offset: 0x40)
        }
        let version = VDILayout.le32(h, 0x44)
        guard version == VDILayout.version else {
            throw FerryError(.notSupported, "vdi version \(version >> 16).\(version & 0xffff) is not supported (only 1.1), at offset 0x44", path: name, offset: 0x44)
        }
        let hsize = VDILayout.le32(h, 0x48)
        guard hsize >= VDILayout.headerSize else {
            throw FerryError(.corrupt, "vdi header size \(hsize) at offset 0x48 is smaller than \(VDILayout.headerSize)", path: name, offset: 0x48)
        }
        let type = VDILayout.le32(h, 0x4c)
        guard type == VDILayout.typeNormal || type == VDILayout.typeFixed else {
            throw FerryError(.notSupported, "vdi image type \(type) at offset 0x4c is not supported (1 normal, 2 fixed; undo and differencing images are not read)",
                             path: name, offset: 0x4c)
        }
        let sectorSize = VDILayout.le32(h, 0x168)
        guard sectorSize == UInt32(VDILayout.sector) else {
            throw FerryError(.corrupt, "vdi sector size \(sectorSize) at offset 0x168 is not 512", path: name, offset: 0x168)
        }
        let bs = Int64(VDILayout.le32(h, 0x178))
        guard bs >= VDILayout.sector, bs <= VDILayout.maxBlockSize, bs & (bs - 1) == 0 else {
            throw FerryError(.corrupt, "vdi block size \(bs) at offset 0x178 is not a power of two from 512 to 256 MiB", path: name, offset: 0x178)
        }
        let extra = VDILayout.le32(h, 0x17c)
        guard extra == 0 else {
            throw FerryError(.notSupported, "vdi block extra data (\(extra) bytes at offset 0x17c) is not supported", path: name, offset: 0x17c)
        }
        let blocks = Int64(VDILayout.le32(h, 0x180))
        let diskSize = VDILayout.le64(h, 0x170)
        guard diskSize <= UInt64(blocks * bs) else {
            throw FerryError(.corrupt, "vdi disk size \(diskSize) at offset 0x170 is larger than its \(blocks) blocks of \(bs) bytes", path: name, offset: 0x170)
        }
        let size = Int64(diskSize)
        let bmapAt = Int64(VDILayout.le32(h, 0x154))
        guard bmapAt >= Int64(VDILayout.headerEnd), bmapAt <= file.size, blocks * 4 <= file.size - bmapAt else {
            throw FerryError(.corrupt, "vdi block map at offset \(bmapAt) (\(blocks * 4) bytes, header at offset 0x154) is past the end of the file (\(file.size) bytes)",
                             path: name, offset: 0x154)
        }
        let dataAt = Int64(VDILayout.le32(h, 0x158))
        guard dataAt >= Int64(VDILayout.headerEnd), dataAt <= file.size else {
            throw FerryError(.corrupt, "vdi data offset \(dataAt) at offset 0x158 is past the end of the file (\(file.size) bytes)", path: name, offset: 0x158)
        }
        let n = Int(blocks)
        var bmap = [UInt32](repeating: VDILayout.free, count: n)
        if n > 0 {
            let raw = AlignedBuffer(count: n * 4)
            try await readHost(file, at: bmapAt, into: raw.slice(0 ..< n * 4))
            let r = raw.bytes
            for i in 0 ..< n {
                let e = VDILayout.le32(r, i * 4)
                bmap[i] = e
                guard e < VDILayout.zero, !checking else { continue }
                let at = bmapAt + Int64(i) * 4
                guard Int64(e) < blocks else {
                    throw FerryError(.corrupt, "vdi block map entry \(i) (block \(e)) at offset \(at) is out of range (\(blocks) blocks)", path: name, offset: at)
                }
                let inImage = max(0, min(bs, size - Int64(i) * bs))
                guard dataAt + Int64(e) * bs + inImage <= file.size else {
                    throw FerryError(.corrupt, "vdi block map entry \(i) (block at offset \(dataAt + Int64(e) * bs)) at offset \(at) lies past the end of the file (\(file.size) bytes)",
                                     path: name, offset: at)
                }
            }
        }
        var details = ImageDetails()
        details.clusterSize = Int(bs)
        return VDIReadDevice(name: name, file: file, size: size, blockSize: bs, dataOffset: dataAt, bmap: bmap,
                             isStatic: type == VDILayout.typeFixed, details: details)
    }
}

/// The guest-visible device of a VDI image (read-only). The block map is immutable; data is
/// read outside any lock, the pieces of one read together.
public final class VDIReadDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities = [.extents, .cheapZeroReads]
    public let backing: (any BlockDevice)? = nil
    public let formatName = "vdi"
    public let details: ImageDetails

    let file: any BlockDevice
    let blockSize: Int64
    let dataOffset: Int64
    let bmap: [UInt32]
    let isStatic: Bool

    init(name: String, file: any BlockDevice, size: Int64, blockSize: Int64, dataOffset: Int64, bmap: [UInt32],
         isStatic: Bool, details: ImageDetails) {
        self.isStatic = isStatic
        self.name = name
        self.file = file
        self.size = size
        self.blockSize = blockSize
        self.dataOffset = dataOffset
        self.bmap = bmap
        self.details = details
        self.limits = BlockLimits(alignment: 1, preferredTransfer: Int(max(blockSize, 1 << 20)), maximumTransfer: 32 << 20)
    }

    /// A run of guest bytes: in the file at `host`, or reading as zeros (`host` nil).
    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var host: Int64?
        var end: Int64 { offset + length }
        func joins(_ next: Run) -> Bool { true }
    }

    /// The runs from `range.lowerBound`, joined where they continue each other (in the guest
    /// and in the file), so that a sparse image costs per allocated run, not per block.
    func runs(in range: Range<Int64>, maxRuns: Int = 2048) -> [Run] {
        var out: [Run] = []
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        while pos < end && out.count < maxRuns {
            let b = Int(pos / blockSize)
            let blockStart = Int64(b) * blockSize
            let stop = min(end, blockStart + blockSize)
            let e = bmap[b]
            out.appendJoining(Run(offset: pos, length: stop - pos,
                                  host: e < VDILayout.zero ? dataOffset + Int64(e) * blockSize + (pos - blockStart) : nil))
            pos = stop
        }
        return out
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await readMapped(at: offset, into: buffer, layer: name, format: "vdi", file: file, backing: nil,
                             runs: { runs(in: $0) }, source: { r in r.host.map { .host($0) } ?? .zeros })
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "existing vdi images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "existing vdi images are read-only in this version of ferry", path: name, offset: offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await layerExtents(in: range)
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        return runs(in: range, maxRuns: 1024).map {
            Extent(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : .data)
        }.coalesced()
    }

    /// As qemu-img 7.2 maps a VDI: free and zero blocks read as zeros; allocated blocks are
    /// data at their place in the file (whole blocks in a dynamic image; in a static one, the
    /// file's holes are also zeros, as qemu asks the file there).
    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        var out: [LayerMapping] = []
        for r in runs(in: range, maxRuns: 1024) {
            guard let host = r.host else {
                out.append(LayerMapping(offset: r.offset, length: r.length, kind: .zero, hostOffset: nil))
                continue
            }
            guard isStatic, file.capabilities.contains(.extents) else {
                out.append(LayerMapping(offset: r.offset, length: r.length, kind: .data, hostOffset: host))
                continue
            }
            var p = host
            let hostEnd = min(host + r.length, file.size)
            if p < hostEnd {
                for e in try await file.extents(in: p ..< hostEnd) {
                    guard e.offset == p, e.length > 0 else { break }
                    let stop = min(e.end, hostEnd)
                    out.append(LayerMapping(offset: r.offset + (p - host), length: stop - p, kind: .data, hostOffset: p, readsAsZero: e.kind != .data))
                    p = stop
                    if p >= hostEnd { break }
                }
            }
            if p < host + r.length {
                out.append(LayerMapping(offset: r.offset + (p - host), length: host + r.length - p, kind: .data, hostOffset: p))
            }
        }
        return out
    }

    public var hostFileName: String { file.name }

    public func flush() async throws {}

    public func close() async throws { try await file.close() }
}
