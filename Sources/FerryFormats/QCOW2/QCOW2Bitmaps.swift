import FerryCore

// Persistent bitmaps' bits (qcow2 spec, "Bitmaps"): a bitmap table of one 64-bit entry per
// cluster of bits (offset in bits 9-55; offset 0 with bit 0 clear reads as all zeros, set as
// all ones), the table and the directory each in contiguous clusters.

extension QCOW2Format {
    static let bitmapEntryOffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    /// Bits that must be zero in a bitmap table entry (bit 0 only matters without an offset).
    static let bitmapEntryReserved: UInt64 = 0xFF00_0000_0000_01FE
    static let bitmapDirtyTrackingType: UInt8 = 1

    /// The bits of `bitmap`, read through its table, every entry checked against the file.
    static func readBitmapBits(_ file: any BlockDevice, bitmap b: QCOW2Bitmap, size: Int64, clusterSize cs: Int64,
                               path: String) async throws -> [UInt8] {
        func corrupt(_ what: String, _ offset: Int64? = nil) -> FerryError {
            FerryError(.corrupt, "qcow2 bitmap '\(b.name)': \(what)", path: path, offset: offset)
        }
        guard b.granularity >= 512, b.granularity <= Int64(1) << 31 else {
            throw corrupt("granularity \(b.granularity) is outside 512 bytes to 2 GiB")
        }
        let bytes = PersistentBitmap.byteCount(size: size, granularity: b.granularity)
        guard bytes <= PersistentBitmap.maxBytes else {
            throw corrupt("its \(bytes) bytes of bits are more than the \(PersistentBitmap.maxBytes) allowed")
        }
        let entries = (bytes + cs - 1) / cs
        guard b.tableSize == entries else {
            throw corrupt("its table has \(b.tableSize) entries, but the image's size needs \(entries)", b.tableOffset)
        }
        guard b.tableOffset > 0, b.tableOffset % cs == 0, b.tableOffset <= file.size - entries * 8 else {
            throw corrupt("its table at \(b.tableOffset) is not aligned to a cluster or lies past the end of the file", b.tableOffset)
        }
        let table = BigEndianBytes(bytes: try await readBytes(file, at: b.tableOffset, count: Int(entries * 8)))
        var bits = [UInt8](repeating: 0, count: Int(bytes))
        for i in 0 ..< Int(entries) {
            let e = table.u64(i * 8)
            let start = Int64(i) * cs
            let n = Int(min(cs, bytes - start))
            let host = Int64(e & bitmapEntryOffsetMask)
            guard e & bitmapEntryReserved == 0, host == 0 || e & 1 == 0 else {
                throw corrupt("table entry \(i) has reserved bits set", b.tableOffset + Int64(i) * 8)
            }
            if host == 0 {
                if e & 1 != 0 { bits.replaceSubrange(Int(start) ..< Int(start) + n, with: repeatElement(0xFF, count: n)) }
                continue
            }
            guard host % cs == 0, host <= file.size - Int64(n) else {
                throw corrupt("table entry \(i) points to \(host), which is not aligned to a cluster or lies past the end of the file", host)
            }
            let data = try await readBytes(file, at: host, count: n)
            bits.replaceSubrange(Int(start) ..< Int(start) + n, with: data)
        }
        // Bits past the last granule mean nothing; keep them clear so copies compare equal.
        let granules = (size + b.granularity - 1) / b.granularity
        if granules % 8 != 0, let last = bits.indices.last { bits[last] &= UInt8((1 << (granules % 8)) - 1) }
        return bits
    }
}

extension QCOW2Device: PersistentBitmapSource {
    public func persistentBitmaps() async throws -> [PersistentBitmap] {
        var out: [PersistentBitmap] = []
        var total: Int64 = 0
        for b in details.persistentBitmaps ?? [] {
            // Many entries can share one table: bound the bits of all of them together.
            total += b.inUse ? 0 : PersistentBitmap.byteCount(size: size, granularity: max(b.granularity, 512))
            guard total <= PersistentBitmap.maxBytes else {
                throw FerryError(.corrupt, "qcow2 persistent bitmaps would take more than \(PersistentBitmap.maxBytes) bytes of bits", path: name)
            }
            let bits = b.inUse ? [] : try await QCOW2Format.readBitmapBits(file, bitmap: b, size: size, clusterSize: clusterSize, path: name)
            out.append(PersistentBitmap(name: b.name, granularity: b.granularity, auto: b.auto, inUse: b.inUse, bits: bits))
        }
        return out
    }
}

extension QCOW2Writer: PersistentBitmapStore {
    /// Writes each bitmap's non-zero clusters of bits, its table, then the directory; the
    /// header that points to them is written by the next commit, so until then the image
    /// has no bitmaps rather than half of one.
    public func store(bitmaps: [PersistentBitmap]) async throws {
        guard !bitmaps.isEmpty else { return }
        guard opts.version >= 3 else {
            throw FerryError(.notSupported, "persistent bitmaps need compat=1.1", path: name)
        }
        guard bitmaps.count <= 65535, Set(bitmaps.map(\.name)).count == bitmaps.count else {
            throw FerryError(.invalidArgument, "persistent bitmaps must have distinct names, at most 65535 of them", path: name)
        }
        var directory: [UInt8] = []
        for b in bitmaps {
            let name8 = Array(b.name.utf8)
            let granularityBits = b.granularity.trailingZeroBitCount
            guard !b.inUse, !name8.isEmpty, name8.count <= 1023, b.granularity.nonzeroBitCount == 1, (9 ... 31).contains(granularityBits),
                  Int64(b.bits.count) == PersistentBitmap.byteCount(size: size, granularity: b.granularity) else {
                throw FerryError(.invalidArgument, "persistent bitmap '\(b.name)' cannot be stored (in use, or its name, granularity or size is invalid)", path: name)
            }
            var table: [UInt64] = []
            var pos = 0
            while pos < b.bits.count {
                let chunk = b.bits[pos ..< min(b.bits.count, pos + Int(cs))]
                if chunk.allSatisfy({ $0 == 0 }) {
                    table.append(0)
                } else {
                    let host = try allocateMetadata(clusters: 1)
                    try await writeHost(Array(chunk) + [UInt8](repeating: 0, count: Int(cs) - chunk.count), at: host)
                    table.append(UInt64(host))
                }
                pos += chunk.count
            }
            var tableBytes = [UInt8](repeating: 0, count: table.count * 8)
            for (i, e) in table.enumerated() { QCOW2HeaderWriter.put64(&tableBytes, i * 8, e) }
            let tableOffset = try allocateMetadata(clusters: (Int64(tableBytes.count) + cs - 1) / cs)
            try await writeHost(tableBytes, at: tableOffset)

            var entry = [UInt8](repeating: 0, count: 24)
            QCOW2HeaderWriter.put64(&entry, 0, UInt64(tableOffset))
            QCOW2HeaderWriter.put32(&entry, 8, UInt32(table.count))
            QCOW2HeaderWriter.put32(&entry, 12, b.auto ? 2 : 0)
            entry[16] = QCOW2Format.bitmapDirtyTrackingType
            entry[17] = UInt8(granularityBits)
            entry[18] = UInt8(name8.count >> 8)
            entry[19] = UInt8(name8.count & 0xFF)
            entry += name8
            entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
            directory += entry
        }
        let directoryOffset = try allocateMetadata(clusters: (Int64(directory.count) + cs - 1) / cs)
        try await writeHost(directory, at: directoryOffset)
        setBitmaps(count: UInt32(bitmaps.count), directorySize: UInt64(directory.count), directoryOffset: UInt64(directoryOffset))
    }
}
