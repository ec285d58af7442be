import FerryConvert
import FerryCore
@testable import FerryFormats
import Foundation
import XCTest

/// Makes cloop and bochs images byte by byte from the formats' descriptions (no tool here
/// writes them), and checks Ferry reads what qemu-img reads, and refuses broken ones.
enum ReadOnlyImages {
    static func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0 ..< n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - $0))) } }
    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0 ..< n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    /// A cloop v2.0 image of `blocks`, each `blockSize` bytes, zlib-compressed one by one.
    static func cloop(_ blocks: [[UInt8]], blockSize: Int) -> [UInt8] {
        var out = CloopFormat.preamble
        out += [UInt8](repeating: 0, count: 128 - out.count)
        out += be(UInt64(blockSize), 4) + be(UInt64(blocks.count), 4)
        let deflater = ZlibDeflater(level: 6, windowBits: 15, memLevel: 8)
        var streams: [[UInt8]] = []
        for b in blocks {
            var o = [UInt8](repeating: 0, count: blockSize * 2 + 64)
            let n = b.withUnsafeBytes { i in o.withUnsafeMutableBytes { deflater.deflate(i, into: $0) } } ?? 0
            o.removeLast(o.count - n)
            streams.append(o)
        }
        var at = UInt64(out.count + (blocks.count + 1) * 8)
        for s in streams {
            out += be(at, 8)
            at += UInt64(s.count)
        }
        out += be(at, 8)
        for s in streams { out += s }
        return out
    }

    /// A bochs growing image: `extents[i]` is nil for an extent never written, or the sectors
    /// written in it (index -> byte they are filled with). Extents are stored in the order of
    /// `order` (guest extent indices).
    static func bochs(diskSize: Int, extentSize: Int, bitmapSize: Int = 512, catalog: Int,
                      written: [Int: [Int: UInt8]], order: [Int], version: UInt32 = 0x20000,
                      subtype: String = "Growing") -> (image: [UInt8], expected: [UInt8]) {
        func padded(_ s: String, _ n: Int) -> [UInt8] { Array(s.utf8) + [UInt8](repeating: 0, count: n - s.utf8.count) }
        var h = padded("Bochs Virtual HD Image", 32) + padded("Redolog", 16) + padded(subtype, 16)
        h += le(UInt64(version), 4) + le(512, 4) + le(UInt64(catalog), 4) + le(UInt64(bitmapSize), 4) + le(UInt64(extentSize), 4)
        h += version == 0x20000 ? le(0, 4) + le(UInt64(diskSize), 8) : le(UInt64(diskSize), 8)
        h += [UInt8](repeating: 0, count: 512 - h.count)
        var cat = [UInt32](repeating: 0xFFFF_FFFF, count: catalog)
        var body: [UInt8] = []
        var expected = [UInt8](repeating: 0, count: diskSize)
        for (k, guest) in order.enumerated() {
            cat[guest] = UInt32(k)
            var bitmap = [UInt8](repeating: 0, count: bitmapSize)
            var data = [UInt8](repeating: 0xEE, count: extentSize)   // unwritten sectors hold junk
            for (s, fill) in written[guest] ?? [:] {
                bitmap[s / 8] |= 1 << UInt8(s % 8)
                for j in s * 512 ..< (s + 1) * 512 { data[j] = fill }
                let g = guest * extentSize + s * 512
                for j in g ..< min(g + 512, diskSize) { expected[j] = fill }
            }
            body += bitmap + data
        }
        return (h + cat.flatMap { le(UInt64($0), 4) } + body, expected)
    }
}

final class CloopBochsReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("roimages") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func save(_ name: String, _ bytes: [UInt8]) throws -> String {
        let path = dir.appendingPathComponent(name).path
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// Ferry's bytes (whole, and at odd offsets) against `expected` and qemu-img's.
    func check(_ path: String, format: String, expected: [UInt8], file: StaticString = #filePath, line: UInt = #line) async throws {
        XCTAssertTrue(try Oracle.reference(path, in: dir) == Data(expected), "qemu-img reads \(path) as built", file: file, line: line)
        let (all, parts, name) = try await withOpened(path) { image -> (Data, [Data], String) in
            var parts: [Data] = []
            for (o, n) in [(1, 1000), (511, 70000), (Int(image.device.size) - 3, 3)] {
                let b = AlignedBuffer(count: n)
                try await image.device.read(at: Int64(o), into: b.mutableBytes)
                parts.append(Data(b.bytes))
            }
            return (try await readAll(image.device, chunk: 12345 * 8), parts, image.format)
        }
        XCTAssertEqual(name, format, file: file, line: line)
        XCTAssertTrue(all == Data(expected), "bytes of \(path)", file: file, line: line)
        for (i, (o, n)) in [(1, 1000), (511, 70000), (expected.count - 3, 3)].enumerated() {
            XCTAssertTrue(parts[i] == Data(expected[o ..< o + n]), "\(path) at \(o)+\(n)", file: file, line: line)
        }
    }

    func testReadsCloopImages() async throws {
        let bs = 64 << 10
        var blocks: [[UInt8]] = []
        var g = SystemRandomNumberGenerator()
        for i in 0 ..< 20 {
            switch i % 4 {
            case 0: blocks.append([UInt8](repeating: UInt8(i), count: bs))
            case 1: blocks.append([UInt8](repeating: 0, count: bs))
            case 2: blocks.append((0 ..< bs).map { _ in UInt8.random(in: 0 ... 255, using: &g) })
            default: blocks.append((0 ..< bs).map { UInt8(truncatingIfNeeded: $0 * 7 + i) })
            }
        }
        try await check(try save("a.cloop", ReadOnlyImages.cloop(blocks, blockSize: bs)), format: "cloop", expected: blocks.flatMap { $0 })
        let small = [[UInt8](repeating: 9, count: 512)] + [(0 ..< 512).map { UInt8($0 & 0xFF) }]
        // Blocks of one sector, 140 of them.
        let many = Array(repeating: small, count: 70).flatMap { $0 }
        try await check(try save("b.cloop", ReadOnlyImages.cloop(many, blockSize: 512)), format: "cloop", expected: many.flatMap { $0 })
    }

    func testReadsBochsImages() async throws {
        for version: UInt32 in [0x20000, 0x10000] {
            let (image, expected) = ReadOnlyImages.bochs(diskSize: 40 * 8192 - 1024, extentSize: 8192, catalog: 40,
                                                         written: [1: [0: 0x11, 1: 0x12, 2: 0x13, 15: 0x14], 7: Dictionary(uniqueKeysWithValues: (0 ..< 16).map { ($0, UInt8(0x70 + $0)) }),
                                                                   8: [3: 0x21], 39: [0: 0x39, 13: 0x3A]],
                                                         order: [7, 1, 39, 8])
            let path = try save("v\(version >> 16).bochs", image)
            try await check(path, format: "bochs", expected: expected)
            // Holes where no sector was written: the written ones are the only data.
            let data = try await withOpened(path) { image in
                try await image.device.extents(in: 0 ..< image.device.size).filter { $0.kind == .data }.map { "\($0.offset)+\($0.length)" }
            }
            XCTAssertEqual(data, ["8192+1536", "15872+512", "57344+8192", "67072+512", "319488+512", "326144+512"])
        }
    }

    // MARK: - Malformed

    func testMalformedCloopImages() async throws {
        let good = ReadOnlyImages.cloop([[UInt8](repeating: 1, count: 4096), [UInt8](repeating: 2, count: 4096)], blockSize: 4096)
        func variant(_ name: String, _ edit: (inout [UInt8]) -> Void) throws -> String {
            var b = good
            edit(&b)
            return try save(name, b)
        }
        func put(_ b: inout [UInt8], _ at: Int, _ v: [UInt8]) { b.replaceSubrange(at ..< at + v.count, with: v) }
        await expectReadError(try variant("bs0", { put(&$0, 128, ReadOnlyImages.be(0, 4)) }), format: "cloop", "block size 0 is not a multiple of 512")
        await expectReadError(try variant("bs1000", { put(&$0, 128, ReadOnlyImages.be(1000, 4)) }), format: "cloop", "block size 1000")
        await expectReadError(try variant("bshuge", { put(&$0, 128, ReadOnlyImages.be(0xFFFF_FE00, 4)) }), format: "cloop", "block size 4294966784")
        await expectReadError(try variant("count", { put(&$0, 132, ReadOnlyImages.be(0x1000_0000, 4)) }), format: "cloop", "offset table of 268435456 blocks ends at")
        await expectReadError(try variant("past", { put(&$0, 136 + 16, ReadOnlyImages.be(1 << 40, 8)) }), format: "cloop", "block 2 starts at file offset 1099511627776")
        await expectReadError(try variant("backwards", { put(&$0, 136 + 8, ReadOnlyImages.be(160, 8)) }), format: "cloop", "block 0 has a compressed length of")
        await expectReadError(try variant("garbage", { b in for i in 160 ..< 166 { b[i] = 0xFF } }), format: "cloop", "cloop block 0 at file offset 160 is not a valid zlib stream")
        // A block that inflates to less than the block size.
        var short = ReadOnlyImages.cloop([[UInt8](repeating: 1, count: 1024)], blockSize: 1024)
        short.replaceSubrange(128 ..< 132, with: ReadOnlyImages.be(2048, 4))
        await expectReadError(try save("short", short), format: "cloop", "inflates to 1024 of its 2048 bytes")
        await expectReadError(try variant("truncated", { $0.removeLast($0.count - 100) }), format: "cloop", "header is truncated")
    }

    func testMalformedBochsImages() async throws {
        let (good, _) = ReadOnlyImages.bochs(diskSize: 4 * 8192, extentSize: 8192, catalog: 4, written: [1: [0: 1]], order: [1])
        func variant(_ name: String, _ edit: (inout [UInt8]) -> Void) throws -> String {
            var b = good
            edit(&b)
            return try save(name, b)
        }
        func put(_ b: inout [UInt8], _ at: Int, _ v: [UInt8]) { b.replaceSubrange(at ..< at + v.count, with: v) }
        await expectReadError(try variant("magic", { $0[0] = 0x62 }), format: "bochs", "bad magic")
        await expectReadError(try variant("version", { put(&$0, 64, ReadOnlyImages.le(0x30000, 4)) }), format: "bochs", "version 0x30000")
        await expectReadError(try variant("extent0", { put(&$0, 80, ReadOnlyImages.le(0, 4)) }), format: "bochs", "extent size 0")
        await expectReadError(try variant("extenthuge", { put(&$0, 80, ReadOnlyImages.le(1 << 31, 4)) }), format: "bochs", "extent size 2147483648")
        await expectReadError(try variant("bitmap", { put(&$0, 76, ReadOnlyImages.le(1, 4)) }), format: "bochs", "bitmap of 1 bytes does not fit the 16 sectors")
        await expectReadError(try variant("disk", { put(&$0, 88, ReadOnlyImages.le(5 * 8192, 8)) }), format: "bochs", "disk size 40960 needs more than the 4 extents")
        await expectReadError(try variant("catalog", { put(&$0, 72, ReadOnlyImages.le(0x1000_0000, 4)) }), format: "bochs", "catalog of 268435456 entries ends at")
        await expectReadError(try variant("entry", { put(&$0, 512 + 4, ReadOnlyImages.le(1000, 4)) }), format: "bochs", "catalog entry 1 puts its extent at file offset")
        await expectReadError(try variant("truncated", { $0.removeLast($0.count - 300) }), format: "bochs", "header is truncated")
        let (undoable, _) = ReadOnlyImages.bochs(diskSize: 8192, extentSize: 8192, catalog: 1, written: [:], order: [], subtype: "Undoable")
        await expectReadError(try save("undoable", undoable), format: "bochs", "'Undoable' redolog, which needs a base image", code: .notSupported)
    }
}


/// Images of every read-only format with random bytes changed in their headers and tables
/// (a dmg's property list and trailer):
/// each either reads or fails with an error, never traps or hangs.
final class ReadOnlyFormatsMutationTests: XCTestCase {
    func testMutatedImagesFailCleanly() async throws {
        let dir = try scratchDirectory("romutate")
        defer { try? FileManager.default.removeItem(at: dir) }
        try Oracle.must("qemu-img", ["create", "-q", "-f", "parallels", "-o", "cluster_size=4k", "p.img", "256k"], in: dir)
        try Oracle.io("p.img", ["write -P 1 0 8k", "write -P 2 100k 4k"], format: "parallels", in: dir)
        let parallels = Array(try Data(contentsOf: dir.appendingPathComponent("p.img")))
        let cloop = ReadOnlyImages.cloop([[UInt8](repeating: 3, count: 2048), [UInt8](repeating: 4, count: 2048)], blockSize: 2048)
        let bochs = ReadOnlyImages.bochs(diskSize: 4 * 4096, extentSize: 4096, catalog: 4, written: [1: [0: 1, 3: 2]], order: [1]).image
        let dmg = DMGReadTests.sample().image
        var g = SystemRandomNumberGenerator()
        var failures = 0, reads = 0
        for (format, image, hot) in [("parallels", parallels, 0 ..< 128), ("cloop", cloop, 128 ..< 170), ("bochs", bochs, 64 ..< 540),
                                     ("dmg", dmg, dmg.count - 2000 ..< dmg.count)] {
            for round in 0 ..< 150 {
                var b = image
                for _ in 0 ..< Int.random(in: 1 ... 4, using: &g) {
                    b[Int.random(in: hot, using: &g)] = UInt8.random(in: 0 ... 255, using: &g)
                }
                if round % 10 == 0 { b.removeLast(Int.random(in: 0 ..< b.count, using: &g)) }
                let path = dir.appendingPathComponent("m.\(format)").path
                try Data(b).write(to: URL(fileURLWithPath: path))
                do {
                    _ = try await withOpened(path, format: format) { image in
                        try await image.device.forEachExtent(in: 0 ..< min(image.device.size, 1 << 20)) { _ in }
                        let n = Int(min(image.device.size, 1 << 20))
                        let buffer = AlignedBuffer(count: max(n, 1))
                        try await image.device.read(at: 0, into: buffer.slice(0 ..< n))
                    }
                    reads += 1
                } catch is FerryError {
                    failures += 1
                }
            }
        }
        XCTAssertGreaterThan(failures, 0)
        XCTAssertEqual(failures + reads, 600)
    }
}

/// Opens `path` as `format`, reads it all, and expects one clear line naming the file.
func expectReadError(_ path: String, format: String, _ words: String, code: FerryError.Code = .corrupt,
                     file: StaticString = #filePath, line: UInt = #line) async {
    do {
        _ = try await withOpened(path, format: format) { try await readAll($0.device) }
        XCTFail("reading \(path) succeeded; expected an error with '\(words)'", file: file, line: line)
    } catch let e as FerryError {
        XCTAssertEqual(e.code, code, e.description, file: file, line: line)
        XCTAssertTrue(e.description.contains(words), "\(e.description)", file: file, line: line)
        XCTAssertTrue(e.description.contains(path), "\(e.description)", file: file, line: line)
        XCTAssertFalse(e.description.contains("\n"), "\(e.description)", file: file, line: line)
    } catch {
        XCTFail("unexpected \(error)", file: file, line: line)
    }
}
