import FerryCore

/// Big-endian field access over bytes read from an image. Reads past the end answer 0; the
/// parser checks lengths before it trusts a field.
struct BigEndianBytes {
    let bytes: [UInt8]

    func u8(_ at: Int) -> UInt8 { at < bytes.count ? bytes[at] : 0 }
    func u16(_ at: Int) -> UInt16 { UInt16(u8(at)) << 8 | UInt16(u8(at + 1)) }
    func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) << 16 | UInt32(u16(at + 2)) }
    func u64(_ at: Int) -> UInt64 { UInt64(u32(at)) << 32 | UInt64(u32(at + 4)) }
    func string(_ at: Int, _ count: Int) -> String {
        let end = min(bytes.count, at + count)
        guard at < end else { return "" }
        return String(decoding: bytes[at ..< end], as: UTF8.self)
    }
}

/// The qcow2 header (versions 2 and 3) and its header extensions, checked against the size
/// of the file before anything in it is trusted.
///
/// Layout (all big-endian): magic 0-3, version 4-7, backing_file_offset 8-15,
/// backing_file_size 16-19, cluster_bits 20-23, size 24-31, crypt_method 32-35,
/// l1_size 36-39, l1_table_offset 40-47, refcount_table_offset 48-55,
/// refcount_table_clusters 56-59, nb_snapshots 60-63, snapshots_offset 64-71; version 3 adds
/// incompatible 72-79, compatible 80-87, autoclear 88-95, refcount_order 96-99,
/// header_length 100-103 and, if the header is long enough, compression_type at 104.
struct QCOW2Header: Sendable {
    static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]

    // Incompatible feature bits.
    static let dirtyBit: UInt64 = 1 << 0
    static let corruptBit: UInt64 = 1 << 1
    static let externalDataBit: UInt64 = 1 << 2
    static let compressionTypeBit: UInt64 = 1 << 3
    static let extendedL2Bit: UInt64 = 1 << 4
    static let knownIncompatible: UInt64 = 0x1F
    // Compatible and autoclear bits.
    static let lazyRefcountsBit: UInt64 = 1 << 0
    static let bitmapsBit: UInt64 = 1 << 0
    static let dataFileRawBit: UInt64 = 1 << 1

    // Header extension types.
    static let extEnd: UInt32 = 0
    static let extBackingFormat: UInt32 = 0xE279_2ACA
    static let extFeatureNames: UInt32 = 0x6803_F857
    static let extBitmaps: UInt32 = 0x2385_2875
    static let extEncryption: UInt32 = 0x0537_BE77
    static let extDataFile: UInt32 = 0x4441_5441

    /// Limits beyond which an image is refused rather than believed (qemu's own limits).
    static let maxL1Bytes: Int64 = 32 << 20
    static let maxRefcountTableBytes: Int64 = 8 << 20
    static let maxSnapshots: UInt32 = 65536
    static let maxSnapshotTableBytes: Int64 = 64 << 20

    var version: UInt32
    var backingFileOffset: UInt64
    var backingFileSize: UInt32
    var clusterBits: Int
    var size: Int64
    var cryptMethod: UInt32
    var l1Size: Int
    var l1TableOffset: Int64
    var refcountTableOffset: Int64
    var refcountTableClusters: UInt32
    var nbSnapshots: UInt32
    var snapshotsOffset: Int64
    var incompatible: UInt64 = 0
    var compatible: UInt64 = 0
    var autoclear: UInt64 = 0
    var refcountOrder: UInt32 = 4
    var headerLength: Int = 72
    var compressionType: UInt8 = 0

    var backingFile: String?
    var backingFormat: String?
    var dataFile: String?
    var bitmaps: (count: UInt32, directorySize: UInt64, directoryOffset: UInt64)?
    var featureNames: [String: String] = [:]

    var clusterSize: Int { 1 << clusterBits }
    var extendedL2: Bool { incompatible & Self.extendedL2Bit != 0 }
    var hasDataFile: Bool { incompatible & Self.externalDataBit != 0 }
    var dataFileRaw: Bool { autoclear & Self.dataFileRawBit != 0 }
    var dirty: Bool { incompatible & Self.dirtyBit != 0 }
    var corrupt: Bool { incompatible & Self.corruptBit != 0 }
    var lazyRefcounts: Bool { compatible & Self.lazyRefcountsBit != 0 }
    var refcountBits: Int { 1 << Int(refcountOrder) }
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    var l2EntryBytes: Int { extendedL2 ? 16 : 8 }
    var l2Entries: Int { clusterSize / l2EntryBytes }
    /// Guest bytes one L2 table maps.
    var l2Coverage: Int64 { Int64(l2Entries) << Int64(clusterBits) }

    /// Parses and checks the header in `data` (the first cluster of the file, or as much of
    /// it as the file has) of a file of `fileSize` bytes.
    init(_ data: [UInt8], fileSize: Int64, path: String) throws {
        func corrupt(_ what: String, _ offset: Int64? = nil) -> FerryError {
            FerryError(.corrupt, "qcow2 " + what, path: path, offset: offset)
        }
        let b = BigEndianBytes(bytes: data)
        guard data.count >= 72 else { throw corrupt("header is truncated (\(data.count) of 72 bytes)", 0) }
        guard Array(data[0 ..< 4]) == Self.magic else { throw corrupt("header has a bad magic", 0) }
        version = b.u32(4)
        if version == 1 {
            throw FerryError(.notSupported, "image is in the old qcow format (version 1), which is not supported", path: path, offset: 4)
        }
        guard version == 2 || version == 3 else { throw corrupt("header has version \(version) (only 2 and 3 exist)", 4) }
        backingFileOffset = b.u64(8)
        backingFileSize = b.u32(16)
        let cb = b.u32(20)
        guard cb >= 9 && cb <= 21 else { throw corrupt("cluster_bits \(cb) is out of range (9 to 21)", 20) }
        clusterBits = Int(cb)
        let rawSize = b.u64(24)
        guard rawSize <= UInt64(1) << 62 else { throw corrupt("virtual size \(rawSize) is too large", 24) }
        size = Int64(rawSize)
        cryptMethod = b.u32(32)
        l1Size = Int(b.u32(36))
        l1TableOffset = Int64(bitPattern: b.u64(40))
        refcountTableOffset = Int64(bitPattern: b.u64(48))
        refcountTableClusters = b.u32(56)
        nbSnapshots = b.u32(60)
        snapshotsOffset = Int64(bitPattern: b.u64(64))

        if version >= 3 {
            guard data.count >= 104 else { throw corrupt("version 3 header is truncated (\(data.count) of 104 bytes)", 0) }
            incompatible = b.u64(72)
            compatible = b.u64(80)
            autoclear = b.u64(88)
            refcountOrder = b.u32(96)
            let hl = b.u32(100)
            guard hl >= 104, hl % 8 == 0, Int(hl) <= min(data.count, 1 << clusterBits) else {
                throw corrupt("header_length \(hl) is invalid", 100)
            }
            headerLength = Int(hl)
            if headerLength > 104 { compressionType = b.u8(104) }
        }
        let cs = Int64(clusterSize)

        // Header extensions, up to the end of the first cluster.
        var pos = headerLength
        let limit = min(data.count, clusterSize)
        while pos + 8 <= limit {
            let type = b.u32(pos)
            let length = Int(b.u32(pos + 4))
            if type == Self.extEnd { break }
            guard length <= limit - pos - 8 else {
                throw corrupt("header extension 0x\(String(type, radix: 16)) runs past the first cluster", Int64(pos))
            }
            let start = pos + 8
            switch type {
            case Self.extBackingFormat:
                backingFormat = b.string(start, length)
            case Self.extDataFile:
                dataFile = b.string(start, length)
            case Self.extFeatureNames:
                var e = start
                while e + 48 <= start + length {
                    let kind = b.u8(e), bit = b.u8(e + 1)
                    var name = b.string(e + 2, 46)
                    if let nul = name.firstIndex(of: "\0") { name = String(name[..<nul]) }
                    featureNames["\(kind):\(bit)"] = name
                    e += 48
                }
            case Self.extBitmaps:
                if length >= 24 { bitmaps = (b.u32(start), b.u64(start + 8), b.u64(start + 16)) }
            default:
                break
            }
            pos = start + (length + 7) / 8 * 8
        }

        // What we cannot read: refuse before looking further.
        if cryptMethod != 0 {
            throw FerryError(.notSupported, "encryption is not supported (the image is encrypted with \(cryptMethod == 1 ? "AES" : cryptMethod == 2 ? "LUKS" : "method \(cryptMethod)"))", path: path)
        }
        if incompatible & QCOW2HeaderWriter.incompleteBit != 0 {
            throw FerryError(.corrupt, "qcow2 image is incomplete: ferry was writing it and did not finish (the conversion failed or was interrupted)", path: path, offset: 72)
        }
        let unknown = incompatible & ~Self.knownIncompatible
        if unknown != 0 {
            let names = (0 ..< 64).filter { unknown & (1 << UInt64($0)) != 0 }.map { featureNames["0:\($0)"] ?? "bit \($0)" }
            throw FerryError(.notSupported, "qcow2 image uses unsupported incompatible features: \(names.joined(separator: ", "))", path: path, offset: 72)
        }
        guard refcountOrder <= 6 else { throw corrupt("refcount_order \(refcountOrder) is out of range (0 to 6)", 96) }
        if incompatible & Self.compressionTypeBit != 0 {
            guard compressionType != 0 else { throw corrupt("compression type bit is set but compression_type is 0", 104) }
        } else if compressionType != 0 {
            throw corrupt("compression_type \(compressionType) is set without the compression type bit", 104)
        }
        guard compressionType <= 1 else {
            throw FerryError(.notSupported, "qcow2 compression type \(compressionType) is not supported", path: path, offset: 104)
        }
        if extendedL2 && clusterBits < 14 {
            throw corrupt("extended L2 entries need clusters of at least 16 KiB (cluster_bits is \(clusterBits))", 20)
        }
        if hasDataFile && dataFile == nil {
            throw FerryError(.notSupported, "qcow2 image uses an external data file but does not name it", path: path)
        }

        // Backing file name: inside the file, at most 1023 bytes.
        if backingFileOffset != 0 {
            guard backingFileSize <= 1023 else { throw corrupt("backing file name is \(backingFileSize) bytes long (at most 1023)", 16) }
            guard backingFileOffset < UInt64(clusterSize), Int(backingFileOffset) + Int(backingFileSize) <= data.count else {
                throw corrupt("backing file name at \(backingFileOffset) lies outside the first cluster", 8)
            }
            if backingFileSize > 0 {
                backingFile = b.string(Int(backingFileOffset), Int(backingFileSize))
            }
        }

        // The L1 table: big enough for the virtual size, aligned, inside the file.
        let needed = (size + l2Coverage - 1) / l2Coverage
        guard Int64(l1Size) >= needed else {
            throw corrupt("L1 table has \(l1Size) entries but the virtual size \(size) needs \(needed)", 36)
        }
        guard Int64(l1Size) * 8 <= Self.maxL1Bytes else { throw corrupt("L1 table of \(l1Size) entries is too large", 36) }
        if l1Size > 0 {
            guard l1TableOffset > 0, l1TableOffset % cs == 0 else {
                throw corrupt("L1 table offset \(l1TableOffset) is not aligned to a cluster", 40)
            }
            guard l1TableOffset <= fileSize, Int64(l1Size) * 8 <= fileSize - l1TableOffset else {
                throw corrupt("L1 table at \(l1TableOffset) (\(l1Size * 8) bytes) lies past the end of the file (\(fileSize) bytes)", 40)
            }
        }
        // The refcount table: not used for reading, but a broken one means a broken image.
        guard refcountTableOffset > 0, refcountTableOffset % cs == 0 else {
            throw corrupt("refcount table offset \(refcountTableOffset) is not aligned to a cluster", 48)
        }
        guard Int64(refcountTableClusters) * cs <= Self.maxRefcountTableBytes,
              refcountTableOffset < fileSize,
              Int64(refcountTableClusters) * cs <= fileSize - refcountTableOffset + cs else {
            throw corrupt("refcount table at \(refcountTableOffset) (\(refcountTableClusters) clusters) lies past the end of the file (\(fileSize) bytes)", 48)
        }
        if nbSnapshots > 0 {
            guard nbSnapshots <= Self.maxSnapshots else { throw corrupt("\(nbSnapshots) snapshots is too many", 60) }
            guard snapshotsOffset > 0, snapshotsOffset % cs == 0, snapshotsOffset < fileSize else {
                throw corrupt("snapshot table offset \(snapshotsOffset) is unaligned or past the end of the file", 64)
            }
        }
    }
}

/// One internal snapshot, as `info` shows it.
public struct QCOW2Snapshot: Sendable, Equatable {
    public var id: String
    public var name: String
    public var vmStateSize: Int64
    public var dateSeconds: Int64
    public var dateNanoseconds: Int64
    public var vmClockNanoseconds: Int64
    public var icount: Int64?
    /// Where the snapshot's L1 table is, and its entries.
    public var l1Offset: Int64 = 0
    public var l1Size: Int = 0
    /// The guest size when the snapshot was taken (from the extra data), if recorded.
    public var diskSize: Int64?
}

/// One persistent dirty bitmap, as `info` shows it.
public struct QCOW2Bitmap: Sendable, Equatable {
    public var name: String
    public var granularity: Int64
    public var inUse: Bool
    public var auto: Bool
    /// Where its bitmap table is, and its entries (for copying the bits).
    var tableOffset: Int64 = 0
    var tableSize: Int64 = 0
}
