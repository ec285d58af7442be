/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as VHDX headers, region tables
/// and log entries use. (zlib's crc32 is the other CRC-32.)
enum VHDXCRC {
    static let table: [UInt32] = (0 ..< 256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0 ..< 8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    /// Continues `crc` (a finished value, 0 to start) over `bytes`.
    static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = ~crc
        table.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xff)] ^ (c >> 8) }
        }
        return ~c
    }

    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 { update(0, bytes) }

    static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { update(0, $0) } }

    /// The checksum of a structure whose 4-byte checksum field at `field` counts as zero.
    static func checksum(_ bytes: [UInt8], zeroingAt field: Int) -> UInt32 {
        var copy = bytes
        for i in field ..< field + 4 { copy[i] = 0 }
        return checksum(copy)
    }
}
