import FerryCore

/// Apple's UDIF disk images (qemu's `dmg`), read only: chunks stored plainly, zlib-compressed,
/// or zero (zero fill and free space). Chunks compressed otherwise (bzip2, LZFSE, ADC; qemu-img
/// here lacks those modules too) make reads of them fail, not the image's description.
/// Images whose block tables are only in a resource fork (no XML property list) are refused.
/// Probed by the "koly" trailer, 512 bytes before the end of the file.
public enum DMGFormat: ReadOnlyImageFormat {
    public static let name = "dmg"

    public static func probe(header: UnsafeRawBufferPointer) -> Bool { false }
    public static var trailerMagic: (magic: [UInt8], fromEnd: Int)? { (DMGLayout.koly, DMGLayout.trailerSize) }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        func corrupt(_ what: String, _ at: Int64) -> FerryError { FerryError(.corrupt, "dmg " + what, path: path, offset: at) }
        guard context.readOnly else { throw FerryError(.notSupported, "dmg images can only be read by ferry", path: path) }
        let size = file.size
        guard size >= Int64(DMGLayout.trailerSize) else {
            throw corrupt("file of \(size) bytes is too short for its 512-byte koly trailer", 0)
        }
        let at = size - Int64(DMGLayout.trailerSize)
        let k = BigEndianBytes(bytes: try await vhdxReadBytes(file, at: at, count: DMGLayout.trailerSize))
        guard Array(k.bytes[0 ..< 4]) == DMGLayout.koly else { throw corrupt("trailer has a bad magic (not 'koly')", at) }
        let dataFork = k.u64(24), xmlOffset = k.u64(216), xmlLength = k.u64(224), sectorCount = k.u64(492)
        guard dataFork <= UInt64(size) else { throw corrupt("data fork offset \(dataFork) is past the end of the file (\(size) bytes)", at + 24) }
        guard xmlLength > 0 else {
            throw FerryError(.notSupported, "dmg image keeps its block tables only in a resource fork (no XML property list), which Ferry does not read",
                             path: path, offset: at + 224)
        }
        guard xmlLength <= DMGLayout.maxPlistBytes, xmlOffset <= UInt64(size), xmlLength <= UInt64(size) - xmlOffset else {
            throw corrupt("property list of \(xmlLength) bytes at offset \(xmlOffset) is not inside the file (\(size) bytes) or longer than \(DMGLayout.maxPlistBytes)", at + 216)
        }
        guard sectorCount <= UInt64(1) << 53 else { throw corrupt("sector count \(sectorCount) is too large", at + 492) }
        let sectors = Int64(sectorCount)
        let plist = try await vhdxReadBytes(file, at: Int64(xmlOffset), count: Int(xmlLength))
        guard let tables = DMGLayout.blkxData(plist) else {
            throw corrupt("property list at offset \(xmlOffset) has no blkx array of base64 tables", Int64(xmlOffset))
        }
        var chunks: [DMGLayout.Chunk] = []
        for (i, t) in tables.enumerated() {
            let b = BigEndianBytes(bytes: t)
            guard t.count >= 204, Array(t[0 ..< 4]) == DMGLayout.mish else {
                throw corrupt("blkx table \(i) is not a 'mish' table of at least 204 bytes", Int64(xmlOffset))
            }
            let first = b.u64(8), dataOffset = b.u64(24), n = Int(b.u32(200))
            guard n <= (t.count - 204) / 40 else {
                throw corrupt("blkx table \(i) lists \(n) chunks but holds \((t.count - 204) / 40)", Int64(xmlOffset))
            }
            guard first <= sectorCount, dataOffset <= UInt64(size) else {
                throw corrupt("blkx table \(i) starts at sector \(first) (of \(sectors)) with data offset \(dataOffset) (file of \(size) bytes)", Int64(xmlOffset))
            }
            for j in 0 ..< n {
                let e = 204 + j * 40
                guard let kind = DMGLayout.kind(b.u32(e)) else { continue }
                let s = b.u64(e + 8), c = b.u64(e + 16), off = b.u64(e + 24), len = b.u64(e + 32)
                guard c > 0 else { continue }
                guard s <= sectorCount - first, c <= sectorCount - first - s else {
                    throw corrupt("chunk \(j) of blkx table \(i) covers \(c) sectors from \(first &+ s), past the disk's \(sectors)", Int64(xmlOffset))
                }
                var chunk = DMGLayout.Chunk(first: Int64(first + s), sectors: Int64(c), kind: kind, host: 0, length: 0)
                if kind != .zero {
                    let stored = kind == .raw ? c * UInt64(DMGLayout.sector) : len
                    let base = dataFork + dataOffset
                    guard off <= UInt64(size), base + off <= UInt64(size), stored <= UInt64(size) - base - off else {
                        throw corrupt("chunk \(j) of blkx table \(i) (sector \(chunk.first)) lies at \(off) + \(stored) bytes in the data, past the end of the file (\(size) bytes)",
                                      Int64(xmlOffset))
                    }
                    if kind == .zlib {
                        guard chunk.sectors <= DMGLayout.maxCompressedSectors, stored > 0, stored <= c * 1024 + 1024 else {
                            throw corrupt("zlib chunk \(j) of blkx table \(i) (sector \(chunk.first)) of \(c) sectors in \(stored) bytes is out of range (at most \(DMGLayout.maxCompressedSectors) sectors)",
                                          Int64(xmlOffset))
                        }
                    }
                    chunk.host = Int64(base + off)
                    chunk.length = Int64(stored)
                }
                chunks.append(chunk)
            }
        }
        chunks.sort { $0.first < $1.first }
        var next: Int64 = 0
        for c in chunks {
            guard c.first == next else {
                throw corrupt(c.first < next ? "chunks overlap at sector \(c.first)" : "no chunk holds sectors \(next) to \(c.first - 1)", Int64(xmlOffset))
            }
            next = c.first + c.sectors
        }
        guard next == sectors else { throw corrupt("no chunk holds sectors \(next) to \(sectors - 1)", Int64(xmlOffset)) }
        return DMGDevice(name: path, file: file, size: sectors * DMGLayout.sector, chunks: chunks)
    }
}
