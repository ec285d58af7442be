#if canImport(Glibc)
import Glibc
#endif
import FerryCore

/// The on-disk structures of a VHD image (Microsoft's Virtual Hard Disk Image Format
/// Specification): the 512-byte footer, the 1024-byte dynamic disk header, the block
/// allocation table. Every number is big-endian.
enum VHDLayout {
    static let sector: Int64 = 512
    static let footerSize = 512
    static let headerSize = 1024
    static let footerCookie = Array("conectix".utf8)
    static let headerCookie = Array("cxsparse".utf8)
    /// A BAT entry of a block that is not allocated.
    static let unallocated: UInt32 = 0xFFFF_FFFF
    static let defaultBlockSize: Int64 = 2 << 20
    /// Largest block size accepted when reading (the spec's default is 2 MiB).
    static let maxBlockSize: Int64 = 256 << 20
    /// The largest disk whose geometry can be stated: 65535 cylinders, 16 heads, 255 sectors.
    static let maxCHSSectors: Int64 = 65535 * 16 * 255
    /// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
    static let epochOffset: Int64 = 946_684_800

    enum DiskType: UInt32 {
        case fixed = 2, dynamic = 3, differencing = 4
        var label: String {
            switch self {
            case .fixed: return "fixed"
            case .dynamic: return "dynamic"
            case .differencing: return "differencing"
            }
        }
    }

    static func be32(_ b: [UInt8], _ at: Int) -> UInt32 {
        (UInt32(b[at]) << 24) | (UInt32(b[at + 1]) << 16) | (UInt32(b[at + 2]) << 8) | UInt32(b[at + 3])
    }
    static func be16(_ b: [UInt8], _ at: Int) -> UInt16 { (UInt16(b[at]) << 8) | UInt16(b[at + 1]) }
    static func be64(_ b: [UInt8], _ at: Int) -> UInt64 { (UInt64(be32(b, at)) << 32) | UInt64(be32(b, at + 4)) }
    static func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
        for i in 0 ..< 4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) }
    }
    static func put16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) {
        b[at] = UInt8(v >> 8); b[at + 1] = UInt8(truncatingIfNeeded: v)
    }
    static func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
        put32(&b, at, UInt32(truncatingIfNeeded: v >> 32)); put32(&b, at + 4, UInt32(truncatingIfNeeded: v))
    }

    /// The one's complement of the sum of every byte, the checksum field counted as zeros.
    static func checksum(_ b: [UInt8], skipping field: Int) -> UInt32 {
        var sum: UInt32 = 0
        for (i, x) in b.enumerated() where i < field || i >= field + 4 { sum &+= UInt32(x) }
        return ~sum
    }

    struct Geometry: Equatable {
        var cylinders: UInt16
        var heads: UInt8
        var sectors: UInt8
        var totalSectors: Int64 { Int64(cylinders) * Int64(heads) * Int64(sectors) }
        static let max = Geometry(cylinders: 65535, heads: 16, sectors: 255)

        /// The specification's CHS algorithm (appendix, "CHS calculation") for `total` sectors.
        init(forSectors total: Int64) {
            let t = Swift.min(total, maxCHSSectors)
            var spt: Int64, heads: Int64, cth: Int64
            if t >= 65535 * 16 * 63 {
                spt = 255; heads = 16; cth = t / spt
            } else {
                spt = 17; cth = t / spt
                heads = Swift.max(4, (cth + 1023) / 1024)
                if cth >= heads * 1024 || heads > 16 { spt = 31; heads = 16; cth = t / spt }
                if cth >= heads * 1024 { spt = 63; heads = 16; cth = t / spt }
            }
            self.init(cylinders: UInt16(Swift.min(65535, cth / heads)), heads: UInt8(heads), sectors: UInt8(spt))
        }

        init(cylinders: UInt16, heads: UInt8, sectors: UInt8) {
            self.cylinders = cylinders
            self.heads = heads
            self.sectors = sectors
        }

        /// The smallest geometry that holds at least `bytes` (as qemu-img sizes a new image
        /// without force_size), or nil when no geometry does.
        static func covering(bytes: Int64) -> Geometry? {
            let want = (bytes + sector - 1) / sector
            guard want <= maxCHSSectors else { return nil }
            var n = want
            while n <= maxCHSSectors {
                let g = Geometry(forSectors: n)
                if g.totalSectors >= want { return g }
                n += 1
            }
            return nil
        }
    }

    /// The footer, at the end of every image (and copied to offset 0 of dynamic ones).
    struct Footer {
        var features: UInt32 = 2
        var version: UInt32 = 0x0001_0000
        var dataOffset: UInt64
        var timestamp: UInt32
        var creatorApp: [UInt8]
        var creatorVersion: UInt32 = 0x0005_0003
        var creatorHost: [UInt8] = Array("Wi2k".utf8)
        var originalSize: UInt64
        var currentSize: UInt64
        var geometry: Geometry
        var diskType: UInt32
        var uniqueID: [UInt8]
        var savedState: UInt8 = 0

        init(dataOffset: UInt64, creatorApp: String, size: Int64, geometry: Geometry, type: DiskType) {
            self.dataOffset = dataOffset
            self.timestamp = VHDLayout.now()
            self.creatorApp = Array(creatorApp.utf8.prefix(4))
            self.originalSize = UInt64(size)
            self.currentSize = UInt64(size)
            self.geometry = geometry
            self.diskType = type.rawValue
            self.uniqueID = (0 ..< 16).map { _ in UInt8.random(in: 0 ... 255) }
            if self.creatorApp.count < 4 { self.creatorApp += [UInt8](repeating: 0x20, count: 4 - self.creatorApp.count) }
        }

        /// Parses 512 bytes; nil when the cookie is not there. Throws on a bad checksum.
        static func parse(_ b: [UInt8], file: String, at offset: Int64) throws -> Footer? {
            guard b.count >= footerSize, Array(b[0 ..< 8]) == footerCookie else { return nil }
            let stored = be32(b, 64)
            let computed = checksum(Array(b[0 ..< footerSize]), skipping: 64)
            guard stored == computed else {
                throw FerryError(.corrupt, "vhd footer checksum mismatch (stored \(hex(stored)), computed \(hex(computed))) at offset \(offset)",
                                 path: file, offset: offset)
            }
            var f = Footer(dataOffset: be64(b, 16), creatorApp: "", size: 0,
                           geometry: Geometry(cylinders: be16(b, 56), heads: b[58], sectors: b[59]), type: .fixed)
            f.features = be32(b, 8)
            f.version = be32(b, 12)
            f.timestamp = be32(b, 24)
            f.creatorApp = Array(b[28 ..< 32])
            f.creatorVersion = be32(b, 32)
            f.creatorHost = Array(b[36 ..< 40])
            f.originalSize = be64(b, 40)
            f.currentSize = be64(b, 48)
            f.diskType = be32(b, 60)
            f.uniqueID = Array(b[68 ..< 84])
            f.savedState = b[84]
            return f
        }

        func bytes() -> [UInt8] {
            var b = [UInt8](repeating: 0, count: footerSize)
            b.replaceSubrange(0 ..< 8, with: footerCookie)
            put32(&b, 8, features)
            put32(&b, 12, version)
            put64(&b, 16, dataOffset)
            put32(&b, 24, timestamp)
            b.replaceSubrange(28 ..< 32, with: creatorApp)
            put32(&b, 32, creatorVersion)
            b.replaceSubrange(36 ..< 40, with: creatorHost)
            put64(&b, 40, originalSize)
            put64(&b, 48, currentSize)
            put16(&b, 56, geometry.cylinders)
            b[58] = geometry.heads
            b[59] = geometry.sectors
            put32(&b, 60, diskType)
            b.replaceSubrange(68 ..< 84, with: uniqueID)
            b[84] = savedState
            put32(&b, 64, checksum(b, skipping: 64))
            return b
        }

        /// The guest size, as qemu-img 7.2 reads it: the current-size field for images from
        /// creators that qemu trusts to state it (and for the largest geometry, which cannot
        /// say more), otherwise the CHS geometry.
        var virtualSize: Int64 {
            let trusted: [[UInt8]] = [Array("win ".utf8), Array("qem2".utf8), Array("d2v ".utf8), Array("CTXS".utf8), [0x74, 0x61, 0x70, 0]]
            if trusted.contains(creatorApp) || geometry == .max { return Int64(clamping: currentSize) }
            return geometry.totalSectors * sector
        }
    }

    struct ParentLocator {
        var code: [UInt8]
        var dataSpace: UInt32
        var dataLength: UInt32
        var dataOffset: UInt64
    }

    /// The dynamic disk header (dynamic and differencing disks).
    struct Header {
        var tableOffset: UInt64
        var maxTableEntries: UInt32
        var blockSize: UInt32
        var parentUniqueID: [UInt8] = [UInt8](repeating: 0, count: 16)
        var parentTimestamp: UInt32 = 0
        var parentName: [UInt8] = [UInt8](repeating: 0, count: 512)
        var locators: [ParentLocator] = []

        init(tableOffset: UInt64, maxTableEntries: UInt32, blockSize: UInt32) {
            self.tableOffset = tableOffset
            self.maxTableEntries = maxTableEntries
            self.blockSize = blockSize
        }

        static func parse(_ b: [UInt8], file: String, at offset: Int64) throws -> Header {
            guard b.count >= headerSize, Array(b[0 ..< 8]) == headerCookie else {
                throw FerryError(.corrupt, "no vhd dynamic disk header (cookie 'cxsparse') at offset \(offset)", path: file, offset: offset)
            }
            let stored = be32(b, 36)
            let computed = checksum(Array(b[0 ..< headerSize]), skipping: 36)
            guard stored == computed else {
                throw FerryError(.corrupt, "vhd dynamic disk header checksum mismatch (stored \(hex(stored)), computed \(hex(computed))) at offset \(offset)",
                                 path: file, offset: offset)
            }
            var h = Header(tableOffset: be64(b, 16), maxTableEntries: be32(b, 28), blockSize: be32(b, 32))
            h.parentUniqueID = Array(b[40 ..< 56])
            h.parentTimestamp = be32(b, 56)
            h.parentName = Array(b[64 ..< 576])
            for i in 0 ..< 8 {
                let at = 576 + i * 24
                let code = Array(b[at ..< at + 4])
                guard code != [0, 0, 0, 0] else { continue }
                h.locators.append(ParentLocator(code: code, dataSpace: be32(b, at + 4), dataLength: be32(b, at + 8),
                                                dataOffset: be64(b, at + 16)))
            }
            return h
        }

        func bytes() -> [UInt8] {
            var b = [UInt8](repeating: 0, count: headerSize)
            b.replaceSubrange(0 ..< 8, with: headerCookie)
            put64(&b, 8, UInt64.max)
            put64(&b, 16, tableOffset)
            put32(&b, 24, 0x0001_0000)
            put32(&b, 28, maxTableEntries)
            put32(&b, 32, blockSize)
            put32(&b, 36, checksum(b, skipping: 36))
            return b
        }
    }

    static func hex(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return "0x" + String(repeating: "0", count: max(0, 8 - s.count)) + s
    }

    /// Seconds since 2000-01-01 UTC.
    static func now() -> UInt32 {
        var t = timespec()
        clock_gettime(CLOCK_REALTIME, &t)
        return UInt32(truncatingIfNeeded: max(0, Int64(t.tv_sec) - epochOffset))
    }

    /// Bytes of a block's sector bitmap, padded to whole sectors.
    static func bitmapBytes(blockSize: Int64) -> Int64 {
        let bits = blockSize / sector
        return ((bits + 7) / 8 + sector - 1) / sector * sector
    }
}
