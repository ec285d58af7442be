import FerryCore

/// The QED header, checked against the size of the file before anything in it is trusted.
///
/// Layout (all little-endian, from qemu's `docs/interop/qed_spec.txt`): magic `QED\0` 0-3,
/// cluster_size 4-7, table_size 8-11 (in clusters), header_size 12-15 (in clusters),
/// features 16-23, compat_features 24-31, autoclear_features 32-39, l1_table_offset 40-47,
/// image_size 48-55, backing_filename_offset 56-59, backing_filename_size 60-63.
struct QEDHeader: Sendable {
    static let magic: [UInt8] = [0x51, 0x45, 0x44, 0x00]
    static let size = 64

    /// The image has a backing file, named in the header.
    static let backingFileBit: UInt64 = 1 << 0
    /// The image was not closed cleanly: its tables may point at clusters never written.
    static let needCheckBit: UInt64 = 1 << 1
    /// The backing file is raw: do not probe it.
    static let backingFormatNoProbeBit: UInt64 = 1 << 2
    static let knownFeatures: UInt64 = 0x7

    var clusterSize: Int64
    var tableSize: Int64
    var headerSize: Int64
    var features: UInt64
    var compatFeatures: UInt64
    var autoclearFeatures: UInt64
    var l1TableOffset: Int64
    var imageSize: Int64
    var backingFilename: String?

    /// Bytes in one L1 or L2 table, and entries in one.
    var tableBytes: Int64 { tableSize * clusterSize }
    var tableEntries: Int64 { tableBytes / 8 }
    var needCheck: Bool { features & Self.needCheckBit != 0 }
    var backingFormat: String? { backingFilename != nil && features & Self.backingFormatNoProbeBit != 0 ? "raw" : nil }

    /// Parses the first bytes of `path` (at least the header's 64, plus the backing file
    /// name if there is one: `readName` reads it).
    static func parse(_ p: [UInt8], fileSize: Int64, path: String,
                      readName: (Int64, Int) async throws -> [UInt8]) async throws -> QEDHeader {
        func bad(_ what: String, _ offset: Int64) -> FerryError {
            FerryError(.corrupt, "qed header: \(what)", path: path, offset: offset)
        }
        guard p.count >= size else { throw bad("the file is shorter than a QED header (\(fileSize) bytes)", 0) }
        guard p.prefix(4).elementsEqual(magic) else { throw bad("bad magic (not QED\\0)", 0) }
        func u32(_ o: Int) -> Int64 { p.withUnsafeBytes { Int64(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: UInt32.self))) } }
        func u64(_ o: Int) -> UInt64 { p.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: UInt64.self)) } }

        let cluster = u32(4)
        guard cluster >= 4096, cluster <= 64 << 20, cluster & (cluster - 1) == 0 else {
            throw bad("cluster size \(cluster) is not a power of two from 4 KiB to 64 MiB", 4)
        }
        let table = u32(8)
        guard (1 ... 16).contains(table) else { throw bad("table size \(table) is not 1 to 16 clusters", 8) }
        let headerClusters = u32(12)
        guard headerClusters >= 1, headerClusters * cluster <= max(fileSize, cluster) else {
            throw bad("header size of \(headerClusters) clusters does not fit in the file", 12)
        }
        let features = u64(16)
        let unknown = features & ~knownFeatures
        guard unknown == 0 else {
            throw FerryError(.notSupported, "qed image uses unknown incompatible features 0x\(String(unknown, radix: 16)), which Ferry cannot read", path: path, offset: 16)
        }
        var h = QEDHeader(clusterSize: cluster, tableSize: table, headerSize: headerClusters, features: features,
                          compatFeatures: u64(24), autoclearFeatures: u64(32), l1TableOffset: 0, imageSize: 0)

        let l1 = u64(40)
        guard l1 != 0, l1 % UInt64(cluster) == 0, l1 < UInt64(fileSize), UInt64(fileSize) - l1 >= UInt64(h.tableBytes) else {
            throw bad("L1 table at \(l1) is not cluster-aligned or lies past the end of the file (\(fileSize) bytes)", 40)
        }
        h.l1TableOffset = Int64(l1)

        // The largest image the two table levels can address.
        let image = u64(48)
        let entries = UInt64(h.tableEntries)
        let (span, o1) = entries.multipliedReportingOverflow(by: entries)
        let (limit, o2) = span.multipliedReportingOverflow(by: UInt64(cluster))
        let maxImage = o1 || o2 ? UInt64(Int64.max) : min(limit, UInt64(Int64.max))
        guard image % 512 == 0, image <= maxImage else {
            throw bad("image size \(image) is not a multiple of 512 or exceeds what the tables address (\(maxImage))", 48)
        }
        h.imageSize = Int64(image)

        if features & backingFileBit != 0 {
            let off = u32(56), count = u32(60)
            let headerEnd = min(headerClusters * cluster, fileSize)
            guard off >= Int64(size), count >= 1, count <= 4096, off + count <= headerEnd else {
                throw bad("backing file name (\(count) bytes at \(off)) lies outside the header (\(headerEnd) bytes)", 56)
            }
            let name = try await readName(off, Int(count))
            h.backingFilename = String(decoding: name, as: UTF8.self)
        }
        return h
    }
}
