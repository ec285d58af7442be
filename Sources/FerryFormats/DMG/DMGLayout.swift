import FerryCore

/// Apple's UDIF disk images (`.dmg`; qemu's `dmg`), as far as Ferry reads them.
///
/// All numbers big-endian. The file ends with a 512-byte "koly" trailer: version 4, the data
/// fork's offset (at 24), the XML property list's offset and length (216, 224), and the disk's
/// sector count (492). The property list's `resource-fork` / `blkx` array holds one `Data`
/// item (base64) per part of the disk: a "mish" table whose first sector is at 8, whose data
/// offset is at 24, and whose chunk count (at 200) is followed by 40-byte chunks: type, a
/// comment field, first sector and sector count (relative to the table's first sector), and
/// the offset (relative to the data fork plus the table's data offset) and length of the
/// chunk's bytes in the file. Sectors are 512 bytes.
enum DMGLayout {
    static let trailerSize = 512
    static let sector: Int64 = 512
    static let koly = Array("koly".utf8)
    static let mish = Array("mish".utf8)
    static let maxPlistBytes: UInt64 = 64 << 20
    /// Most sectors in one compressed chunk (64 MiB inflated): Apple's tools write 2048 at most.
    static let maxCompressedSectors: Int64 = 1 << 17

    enum Kind: Equatable, Sendable {
        case zero, raw, zlib
        /// Compressed in a way Ferry does not inflate (bzip2, LZFSE, ADC, ...): reading it is
        /// an error, describing the image is not.
        case unsupported(String)
    }

    /// One run of the disk: `sectors` from `first`, stored as `kind` at `host` (`length` bytes).
    struct Chunk: Sendable {
        var first: Int64
        var sectors: Int64
        var kind: Kind
        var host: Int64
        var length: Int64
        var start: Int64 { first * sector }
        var end: Int64 { (first + sectors) * sector }
    }

    /// What a chunk's type is, or nil to skip it (comments, the terminator).
    static func kind(_ type: UInt32) -> Kind? {
        switch type {
        case 0x0000_0000, 0x0000_0002: return .zero   // zero fill; free space
        case 0x0000_0001: return .raw
        case 0x8000_0005: return .zlib
        case 0x7FFF_FFFE, 0xFFFF_FFFF: return nil     // comment; last entry
        case 0x8000_0004: return .unsupported("ADC")
        case 0x8000_0006: return .unsupported("bzip2")
        case 0x8000_0007: return .unsupported("LZFSE")
        case 0x8000_0008: return .unsupported("LZMA")
        default: return .unsupported("the unknown method 0x\(String(type, radix: 16))")
        }
    }

    /// The bytes of every `<data>` item of the `blkx` array of a property list, base64-decoded.
    /// Nil if there is no `blkx` array or an item is not base64.
    static func blkxData(_ plist: [UInt8]) -> [[UInt8]]? {
        guard let key = find(Array("<key>blkx</key>".utf8), in: plist, from: 0),
              let open = find(Array("<array>".utf8), in: plist, from: key),
              let close = find(Array("</array>".utf8), in: plist, from: open) else { return nil }
        var out: [[UInt8]] = []
        var pos = open
        let start = Array("<data>".utf8), stop = Array("</data>".utf8)
        while let a = find(start, in: plist, from: pos), a < close, let b = find(stop, in: plist, from: a) {
            guard let bytes = base64(plist[a + start.count ..< b]) else { return nil }
            out.append(bytes)
            pos = b
        }
        return out
    }

    static func find(_ needle: [UInt8], in hay: [UInt8], from: Int) -> Int? {
        guard needle.count <= hay.count else { return nil }
        var i = from
        while i + needle.count <= hay.count {
            if hay[i] == needle[0] && hay[i ..< i + needle.count].elementsEqual(needle) { return i }
            i += 1
        }
        return nil
    }

    /// Base64 (RFC 4648), whitespace ignored; nil on any other character.
    static func base64(_ text: ArraySlice<UInt8>) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(text.count * 3 / 4)
        var acc: UInt32 = 0, bits = 0
        for c in text {
            let v: UInt32
            switch c {
            case UInt8(ascii: "A") ... UInt8(ascii: "Z"): v = UInt32(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a") ... UInt8(ascii: "z"): v = UInt32(c - UInt8(ascii: "a")) + 26
            case UInt8(ascii: "0") ... UInt8(ascii: "9"): v = UInt32(c - UInt8(ascii: "0")) + 52
            case UInt8(ascii: "+"): v = 62
            case UInt8(ascii: "/"): v = 63
            case UInt8(ascii: "="), 9, 10, 13, 32: continue
            default: return nil
            }
            acc = acc << 6 | v
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
            }
        }
        return out
    }
}
