import FerryConvert
import FerryCore
@testable import FerryFormats
import Foundation
import XCTest

/// dmg (UDIF) images built byte by byte from the format's description (no tool here writes
/// them): Ferry reads what qemu-img reads, probes them by their trailer, refuses broken ones.
final class DMGReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("dmg") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// One chunk of a table: its type, first sector (relative to the table), sector count, and
    /// its bytes in the file (nil for none), compressed already for compressed types.
    struct Chunk {
        var type: UInt32
        var sector: UInt64
        var count: UInt64
        var bytes: [UInt8]?
    }

    static let be = ReadOnlyImages.be

    /// A dmg: `pad` bytes (the data fork starts after them when `forkOffset`), the chunks' bytes
    /// (each table's data offset `tableOffset`), the property list, the koly trailer.
    static func dmg(tables: [(first: UInt64, chunks: [Chunk])], sectors: UInt64, pad: Int = 0, forkOffset: Bool = false,
                    tableOffset: UInt64 = 0, edit: (inout [UInt8]) -> Void = { _ in }) -> [UInt8] {
        var data = [UInt8](repeating: 0xEE, count: pad + Int(tableOffset))
        let base = UInt64(forkOffset ? pad : 0) + tableOffset
        var encoded: [String] = []
        for t in tables {
            var m = Array("mish".utf8) + be(1, 4) + be(t.first, 8) + be(t.chunks.reduce(0) { $0 + $1.count }, 8) + be(tableOffset, 8)
            m += [UInt8](repeating: 0, count: 200 - m.count) + be(UInt64(t.chunks.count + 1), 4)
            for c in t.chunks {
                var off: UInt64 = 0
                if let b = c.bytes {
                    off = UInt64(data.count) - base
                    data += b
                }
                m += be(UInt64(c.type), 4) + be(0, 4) + be(c.sector, 8) + be(c.count, 8) + be(off, 8) + be(UInt64(c.bytes?.count ?? 0), 8)
            }
            m += be(0xFFFF_FFFF, 4) + [UInt8](repeating: 0, count: 36)
            edit(&m)
            let b64 = Data(m).base64EncodedString(options: [.lineLength64Characters, .endLineWithLineFeed])
            encoded.append("\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\(b64)\n\t\t\t\t</data>\n\t\t\t</dict>\n")
        }
        let plist = Array(("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<plist version=\"1.0\">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n"
            + "\t\t<key>blkx</key>\n\t\t<array>\n" + encoded.joined() + "\t\t</array>\n\t</dict>\n</dict>\n</plist>\n").utf8)
        let xmlAt = UInt64(data.count)
        var koly = Array("koly".utf8) + be(4, 4) + be(512, 4) + be(1, 4) + be(0, 8) + be(forkOffset ? UInt64(pad) : 0, 8) + be(xmlAt, 8)
        koly += [UInt8](repeating: 0, count: 216 - koly.count) + be(xmlAt, 8) + be(UInt64(plist.count), 8)
        koly += [UInt8](repeating: 0, count: 488 - koly.count) + be(1, 4) + be(sectors, 8)
        koly += [UInt8](repeating: 0, count: 512 - koly.count)
        return data + plist + koly
    }

    static func zlib(_ bytes: [UInt8]) -> [UInt8] {
        let d = ZlibDeflater(level: 6, windowBits: 15, memLevel: 8)
        var out = [UInt8](repeating: 0, count: bytes.count * 2 + 64)
        let n = bytes.withUnsafeBytes { i in out.withUnsafeMutableBytes { d.deflate(i, into: $0) } } ?? 0
        return Array(out[0 ..< n])
    }

    /// 96 sectors: raw, zero fill, zlib, free space, then a second table of raw and zlib.
    static func sample(pad: Int = 0, forkOffset: Bool = false, tableOffset: UInt64 = 0) -> (image: [UInt8], expected: [UInt8]) {
        let raw = (0 ..< 4096).map { UInt8(truncatingIfNeeded: $0 * 3 + 1) }
        let packed = (0 ..< 8192).map { UInt8(truncatingIfNeeded: $0 / 7) }
        let tail = [UInt8](repeating: 0x5A, count: 2048) + (0 ..< 14336).map { UInt8(truncatingIfNeeded: $0 % 251) }
        let image = dmg(tables: [
            (0, [Chunk(type: 1, sector: 0, count: 8, bytes: raw), Chunk(type: 0, sector: 8, count: 8, bytes: nil),
                 Chunk(type: 0x8000_0005, sector: 16, count: 16, bytes: zlib(packed)), Chunk(type: 0x7FFF_FFFE, sector: 32, count: 0, bytes: nil),
                 Chunk(type: 2, sector: 32, count: 32, bytes: nil)]),
            (64, [Chunk(type: 1, sector: 0, count: 4, bytes: Array(tail[0 ..< 2048])),
                  Chunk(type: 0x8000_0005, sector: 4, count: 28, bytes: zlib(Array(tail[2048...])))]),
        ], sectors: 96, pad: pad, forkOffset: forkOffset, tableOffset: tableOffset)
        let expected = raw + [UInt8](repeating: 0, count: 4096) + packed + [UInt8](repeating: 0, count: 16384) + tail
        return (image, expected)
    }

    func save(_ name: String, _ bytes: [UInt8]) throws -> String {
        let path = dir.appendingPathComponent(name).path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    func testReadsDMGImages() async throws {
        for (name, pad, fork, table) in [("plain.dmg", 0, false, UInt64(0)), ("fork.dmg", 1000, true, 0), ("table.dmg", 0, false, 1536)] {
            let (image, expected) = Self.sample(pad: pad, forkOffset: fork, tableOffset: table)
            let path = try save(name, image)
            XCTAssertTrue(try Oracle.reference(path, in: dir) == Data(expected), "qemu-img reads \(name) as built")
            let (all, part, format, extents) = try await withOpened(path) { image -> (Data, Data, String, [String]) in
                let b = AlignedBuffer(count: 5000)
                try await image.device.read(at: 7000, into: b.mutableBytes)   // raw, zero, and part of a zlib chunk
                let e = try await image.device.extents(in: 0 ..< image.device.size).map { "\($0.offset)+\($0.length):\($0.kind)" }
                return (try await readAll(image.device, chunk: 3000), Data(b.bytes), image.format, e)
            }
            XCTAssertEqual(format, "dmg", "probed by the koly trailer")
            XCTAssertTrue(all == Data(expected), name)
            XCTAssertTrue(part == Data(expected[7000 ..< 12000]), name)
            XCTAssertEqual(extents, ["0+4096:data", "4096+4096:zero", "8192+8192:data", "16384+16384:zero", "32768+16384:data"], name)
        }
    }

    /// A chunk compressed with bzip2 (which qemu-img here cannot read either): the image is
    /// described, reading that chunk fails with one line, the rest reads.
    func testUnsupportedCompressionFailsOnlyWhereRead() async throws {
        let path = try save("bz.dmg", Self.dmg(tables: [(0, [Chunk(type: 1, sector: 0, count: 1, bytes: [UInt8](repeating: 7, count: 512)),
                                                             Chunk(type: 0x8000_0006, sector: 1, count: 1, bytes: Array("BZh9".utf8))])], sectors: 2))
        try await withOpened(path) { image in
            XCTAssertEqual(image.device.size, 1024)
            let b = AlignedBuffer(count: 512)
            try await image.device.read(at: 0, into: b.mutableBytes)
            XCTAssertEqual(Array(b.bytes), [UInt8](repeating: 7, count: 512))
            do {
                try await image.device.read(at: 512, into: b.mutableBytes)
                XCTFail("read a bzip2 chunk")
            } catch let e as FerryError {
                XCTAssertTrue(e.description.contains("dmg chunk of sector 1 is compressed with bzip2, which Ferry does not read"), e.description)
            }
        }
    }

    func testMalformedDMGImages() async throws {
        let good = Self.sample().image
        let trailer = good.count - 512
        func put(_ b: inout [UInt8], _ at: Int, _ v: [UInt8]) { b.replaceSubrange(at ..< at + v.count, with: v) }
        func variant(_ name: String, _ edit: (inout [UInt8]) -> Void) throws -> String {
            var b = good
            edit(&b)
            return try save(name, b)
        }
        func table(_ name: String, _ edit: @escaping (inout [UInt8]) -> Void, sectors: UInt64 = 96) throws -> String {
            let raw = [UInt8](repeating: 1, count: 4096)
            return try save(name, Self.dmg(tables: [(0, [Chunk(type: 1, sector: 0, count: 8, bytes: raw)])], sectors: sectors, edit: edit))
        }
        let cases: [(String, String)] = [
            (try variant("magic", { $0[trailer] = 0x4B }), "trailer has a bad magic"),
            (try variant("xmlpast", { put(&$0, trailer + 216, Self.be(1 << 40, 8)) }), "property list of"),
            (try variant("xmlhuge", { put(&$0, trailer + 224, Self.be(1 << 30, 8)) }), "property list of 1073741824 bytes"),
            (try variant("fork", { put(&$0, trailer + 24, Self.be(1 << 40, 8)) }), "data fork offset 1099511627776 is past the end"),
            (try variant("sectors", { put(&$0, trailer + 492, Self.be(UInt64.max, 8)) }), "sector count 18446744073709551615 is too large"),
            (try variant("moresectors", { put(&$0, trailer + 492, Self.be(100, 8)) }), "no chunk holds sectors 96 to 99"),
            (try variant("noblkx", { b in
                let key = DMGLayout.find(Array("<key>blkx</key>".utf8), in: b, from: 0)!
                b[key + 5] = UInt8(ascii: "X")
            }), "has no blkx array"),
            (try variant("base64", { b in
                let d = DMGLayout.find(Array("<data>".utf8), in: b, from: 0)!
                b[d + 8] = UInt8(ascii: "*")
            }), "has no blkx array of base64 tables"),
            (try table("mish", { $0[0] = 0x4D }), "blkx table 0 is not a 'mish' table"),
            (try table("count", { put(&$0, 200, Self.be(1000, 4)) }), "blkx table 0 lists 1000 chunks but holds 2"),
            (try table("pastdisk", { put(&$0, 204 + 16, Self.be(1000, 8)) }), "covers 1000 sectors from 0, past the disk's 96"),
            (try table("pastfile", { put(&$0, 204 + 24, Self.be(1 << 20, 8)) }), "past the end of the file"),
            (try table("gap", { _ in }), "no chunk holds sectors 8 to 95"),
            (try table("overlap", { put(&$0, 204 + 40, Self.be(1, 4) + Self.be(0, 4) + Self.be(4, 8) + Self.be(8, 8)) }), "chunks overlap at sector 4"),
            (try table("zlibhuge", { put(&$0, 204, Self.be(0x8000_0005, 4)); put(&$0, 204 + 16, Self.be(1 << 20, 8)) }, sectors: 1 << 20),
             "out of range (at most 131072 sectors)"),
            (try table("zlibbad", { put(&$0, 204, Self.be(0x8000_0005, 4)) }, sectors: 8), "dmg zlib chunk of sector 0 at file offset 0 is not a valid zlib stream"),
        ]
        for (path, words) in cases { await expectReadError(path, format: "dmg", words) }
        // Block tables only in a resource fork.
        let rsrc = try variant("rsrc", { put(&$0, trailer + 224, Self.be(0, 8)) })
        await expectReadError(rsrc, format: "dmg", "only in a resource fork", code: .notSupported)
        // A file shorter than the trailer.
        await expectReadError(try save("short", Array("koly".utf8)), format: "dmg", "too short for its 512-byte koly trailer")
    }
}
