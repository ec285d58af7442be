import FerryConvert
import FerryCore
@testable import FerryFormats
import Foundation
import XCTest

/// Little-endian access to a VHDX file, to make (differencing images, logs) and break
/// images in known ways. Checksums are recomputed with Ferry's CRC-32C, which is itself
/// tested against known vectors.
struct VHDXPatcher {
    let path: String

    func write(_ bytes: [UInt8], at offset: Int64) throws { try Patcher(path: path).write(bytes, at: offset) }
    func read(at offset: Int64, count: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        var out = Array(try h.read(upToCount: count) ?? Data())
        out += [UInt8](repeating: 0, count: count - out.count)
        return out
    }
    func le(_ value: UInt64, _ n: Int) -> [UInt8] { (0 ..< n).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }
    func u32(_ value: UInt32, at offset: Int64) throws { try write(le(UInt64(value), 4), at: offset) }
    func u64(_ value: UInt64, at offset: Int64) throws { try write(le(value, 8), at: offset) }
    func readU32(at offset: Int64) throws -> UInt32 { UInt32(try readU64(at: offset) & 0xffff_ffff) }
    func readU64(at offset: Int64) throws -> UInt64 {
        try read(at: offset, count: 8).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// The header with the higher sequence number (the one a reader uses).
    func activeHeader() throws -> Int64 {
        try readU64(at: (64 << 10) + 8) >= readU64(at: (128 << 10) + 8) ? 64 << 10 : 128 << 10
    }
    /// Recomputes the CRC-32C of the structure of `length` bytes at `offset`.
    func reseal(_ offset: Int64, length: Int) throws {
        var bytes = try read(at: offset, count: length)
        for i in 4 ..< 8 { bytes[i] = 0 }
        try u32(VHDXCRC.checksum(bytes), at: offset + 4)
    }
    /// The region table's (offset, length) of a region.
    func region(_ id: VHDXGUID) throws -> (Int64, Int64) {
        let t = try read(at: 192 << 10, count: 64 << 10)
        let b = VHDXBytes(t)
        for i in 0 ..< Int(b.u32(8)) where b.guid(16 + i * 32) == id {
            return (Int64(b.u64(16 + i * 32 + 16)), Int64(b.u32(16 + i * 32 + 24)))
        }
        throw XCTSkip("no region \(id)")
    }
    var bat: Int64 { get throws { try region(VHDXLayout.batRegion).0 } }
    var metadata: Int64 { get throws { try region(VHDXLayout.metadataRegion).0 } }
    /// The file offset of a metadata item, and the offset of its table entry.
    func item(_ id: VHDXGUID) throws -> (at: Int64, entry: Int64) {
        let m = try metadata
        let b = VHDXBytes(try read(at: m, count: 64 << 10))
        for i in 0 ..< Int(b.u16(10)) where b.guid(32 + i * 32) == id {
            return (m + Int64(b.u32(32 + i * 32 + 16)), m + Int64(32 + i * 32))
        }
        throw XCTSkip("no metadata item \(id)")
    }

    /// Makes this (dynamic, qemu-made) image a differencing image over `parent`, whose
    /// relative path the locator stores as `relative` (and `parent_linkage` its DataWriteGuid).
    func makeDifferencing(parent: String, relative: String) throws {
        let p = VHDXPatcher(path: parent)
        let linkage = "{" + VHDXBytes(try p.read(at: try p.activeHeader() + 32, count: 16)).guid(0).description.lowercased() + "}"
        // qemu-img marks unwritten blocks ZERO; in a differencing image they are NOT_PRESENT.
        let b = try bat
        let blocks = VHDXBytes(try read(at: b, count: 8 * 4096))
        for i in 0 ..< 4096 where blocks.u64(i * 8) & 7 == 2 { try u64(0, at: b + Int64(i) * 8) }
        let params = try item(VHDXLayout.fileParameters)
        try u32(try readU32(at: params.at + 4) | 2, at: params.at + 4)
        // The parent locator: a new metadata item at region offset 192 KiB.
        let m = try metadata
        let count = Int(try read(at: m + 10, count: 2).reversed().reduce(0) { $0 << 8 | Int($1) })
        var loc: [UInt8] = VHDXLayout.vhdxParentLocatorType.bytes + [0, 0]
        let pairs = [("parent_linkage", linkage), ("relative_path", relative)]
        loc += le(UInt64(pairs.count), 2)
        var strings: [UInt8] = []
        var table: [UInt8] = []
        let base = 20 + pairs.count * 12
        for (k, v) in pairs {
            let kb = k.utf16.flatMap { le(UInt64($0), 2) }, vb = v.utf16.flatMap { le(UInt64($0), 2) }
            table += le(UInt64(base + strings.count), 4) + le(UInt64(base + strings.count + kb.count), 4)
                + le(UInt64(kb.count), 2) + le(UInt64(vb.count), 2)
            strings += kb + vb
        }
        loc += table + strings
        try write(loc, at: m + (192 << 10))
        try write(VHDXLayout.parentLocator.bytes + le(192 << 10, 4) + le(UInt64(loc.count), 4) + le(4, 4) + le(0, 4),
                  at: m + 32 + Int64(count) * 32)
        try write(le(UInt64(count + 1), 2), at: m + 10)
    }
}

enum VHDXOracle {
    /// `qemu-img create -f vhdx -o options name size`, then qemu-io writes.
    @discardableResult
    static func make(_ name: String, size: String, options: String = "", writes: [String] = [], in dir: URL,
                     file: StaticString = #filePath, line: UInt = #line) throws -> String {
        var args = ["create", "-q", "-f", "vhdx"]
        if !options.isEmpty { args += ["-o", options] }
        try Oracle.must("qemu-img", args + [name, size], in: dir, file: file, line: line)
        try Oracle.io(name, writes, format: "vhdx", in: dir, file: file, line: line)
        return dir.appendingPathComponent(name).path
    }

    static let writes = [
        "write -P 0xab 0 4k",
        "write -P 0x11 1M 3M",
        "write -P 0x22 5243392 3584",
        "write -z 8M 1M",
        "write -P 0x33 20M 66048",
        "write -P 0x44 63M 1M",
    ]
}

/// Images qemu-img made, read by Ferry and compared with what qemu-img reads from them.
final class VHDXReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vhdx-read") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func testCRC32CKnownVectors() {
        XCTAssertEqual(VHDXCRC.checksum(Array("123456789".utf8)), 0xE306_9283)
        XCTAssertEqual(VHDXCRC.checksum([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(VHDXCRC.checksum([UInt8](repeating: 0xff, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(VHDXCRC.checksum((0 ..< 32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(VHDXCRC.checksum([]), 0)
    }

    func testGUIDText() {
        let g = VHDXGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
        XCTAssertEqual(g.bytes, [0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08])
        XCTAssertEqual(g.description, "2DC27766-F623-4200-9D64-115E9BFD4A08")
    }

    /// Reads `path` whole (many requests at once), converts it with Ferry, and judges the
    /// result with qemu-img compare; the extents must hold exactly the data.
    func checkAgainstQemu(_ path: String, sparse: Bool = true, file: StaticString = #filePath, line: UInt = #line) async throws {
        let reference = try Oracle.reference(path, in: dir)
        try await withOpened(path) { image in
            XCTAssertEqual(image.format, "vhdx", file: file, line: line)
            XCTAssertEqual(image.device.size, Int64(reference.count), file: file, line: line)
            let data = try await readAll(image.device, chunk: 300 << 10)
            XCTAssertTrue(data == reference, "\(path): Ferry's bytes differ from qemu-img's", file: file, line: line)
            // Every byte outside the data extents is zero.
            var dataBytes: Int64 = 0
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { e in
                if e.kind == .data { dataBytes += e.length; return }
                XCTAssertTrue(data[Int(e.offset) ..< Int(e.end)].allSatisfy { $0 == 0 }, "\(e) is not zeros", file: file, line: line)
            }
            if sparse { XCTAssertLessThan(dataBytes, image.device.size, "a sparse image is all data", file: file, line: line) }
        }
        let out = dir.appendingPathComponent("ferry-\(UUID().uuidString.prefix(6)).raw").path
        var options = ConvertOptions()
        options.targetCache = .unsafe
        _ = try await convert(sources: [ImageSpec(path)], target: ImageSpec(out, format: "raw"), options: options)
        try Oracle.must("qemu-img", ["compare", "-f", "vhdx", "-F", "raw", path, out], in: dir, file: file, line: line)
    }

    func testDynamicAndFixedOfSeveralBlockSizes() async throws {
        for (name, options) in [("dyn.vhdx", ""), ("dyn1m.vhdx", "block_size=1M"), ("dyn256m.vhdx", "block_size=256M"),
                                ("fixed.vhdx", "subformat=fixed,block_size=2M"), ("s4k.vhdx", "block_size=4M,block_state_zero=off")] {
            let path = try VHDXOracle.make(name, size: "64M", options: options, writes: VHDXOracle.writes, in: dir)
            try await checkAgainstQemu(path, sparse: !options.contains("fixed") && !options.contains("256M"))
        }
        // A size that is not a multiple of the block size.
        let odd = try VHDXOracle.make("odd.vhdx", size: "5243392", options: "block_size=1M",
                                      writes: ["write -P 0x77 4M 1048576", "write -P 0x78 5242880 512"], in: dir)
        try await checkAgainstQemu(odd)
    }

    /// 4096-byte logical sectors (qemu-img can neither make nor read them; its image is
    /// patched to say so, and judged against what qemu-img read before): the chunk ratio
    /// changes, the payload entries stay where they were.
    func testLogicalSectorsOf4096() async throws {
        let path = try VHDXOracle.make("4k.vhdx", size: "64M", options: "block_size=1M", writes: VHDXOracle.writes, in: dir)
        let reference = try Oracle.reference(path, in: dir)
        let p = VHDXPatcher(path: path)
        try p.u32(4096, at: try p.item(VHDXLayout.logicalSectorSize).at)
        try await withOpened(path) { image in
            XCTAssertEqual((image.device as? VHDXReadDevice)?.parsed.chunkRatio, 32768)
            let data = try await readAll(image.device, chunk: 300 << 10)
            XCTAssertTrue(data == reference)
        }
    }

    /// A large sparse image: extents come from the BAT, so converting it reads only its data.
    func testLargeSparseImageReadsOnlyItsData() async throws {
        let path = try VHDXOracle.make("big.vhdx", size: "1T", writes: ["write -P 0x5a 700G 1M"], in: dir)
        try await withOpened(path) { image in
            var data: [Extent] = []
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { if $0.kind == .data { data.append($0) } }
            XCTAssertEqual(data.count, 1)
            XCTAssertLessThanOrEqual(data.first?.length ?? 0, 32 << 20)
            let b = AlignedBuffer(count: 1 << 20)
            try await image.device.read(at: 700 << 30, into: b.mutableBytes)
            XCTAssertTrue(b.bytes.allSatisfy { $0 == 0x5a })
        }
    }

    /// A differencing image (qemu-img cannot make one: a qemu-made image is made one here):
    /// NOT_PRESENT blocks fall through to the parent, FULLY_PRESENT ones are the child's,
    /// PARTIALLY_PRESENT ones go sector by sector after the sector bitmap, ZERO ones are zeros.
    func testDifferencing() async throws {
        let parent = try VHDXOracle.make("base.vhdx", size: "64M", options: "block_size=1M",
                                         writes: ["write -P 0x61 0 64M"], in: dir)
        let child = try VHDXOracle.make("child.vhdx", size: "64M", options: "block_size=1M",
                                        writes: ["write -P 0x62 2M 1M", "write -P 0x63 5M 1M", "write -P 0x64 7M 1M"], in: dir)
        var expected = [UInt8](repeating: 0x61, count: 64 << 20)
        for i in (2 << 20) ..< (3 << 20) { expected[i] = 0x62 }
        let p = VHDXPatcher(path: child)
        try p.makeDifferencing(parent: parent, relative: ".\\base.vhdx")
        // Block 5: partially present, sectors 0..7 and 100 from the child.
        let bat = try p.bat
        let entry5 = try p.readU64(at: bat + 5 * 8)
        XCTAssertEqual(entry5 & 7, 6)
        try p.u64(entry5 & ~7 | 7, at: bat + 5 * 8)
        let size = Int64(try FileManager.default.attributesOfItem(atPath: child)[.size] as! Int)
        let bitmapAt = (size + (1 << 20) - 1) / (1 << 20) * (1 << 20)
        var bits = [UInt8](repeating: 0, count: 1 << 20)
        let firstSector = 5 * 2048
        for s in [0, 1, 2, 3, 4, 5, 6, 7, 100] {
            let k = firstSector + s
            bits[k / 8] |= 1 << UInt8(k % 8)
            for i in 0 ..< 512 { expected[(5 << 20) + s * 512 + i] = 0x63 }
        }
        try p.write(bits, at: bitmapAt)
        try p.u64(UInt64(bitmapAt) | 6, at: bat + 4096 * 8)
        // Block 7: ZERO in the child.
        try p.u64(2, at: bat + 7 * 8)
        for i in (7 << 20) ..< (8 << 20) { expected[i] = 0 }

        // qemu-img 7.2 does not open differencing VHDX at all.
        let theirs = try Oracle.run("qemu-img", ["info", child], in: dir)
        XCTAssertNotEqual(theirs.status, 0, theirs.stdout)
        try await withOpened(child) { image in
            XCTAssertNotNil((image.device as? VHDXReadDevice)?.backing)
            let data = try await readAll(image.device, chunk: 300 << 10)
            XCTAssertTrue(data == Data(expected), "differencing image reads wrong")
            var layer: [Extent] = []
            let dev = image.device as! VHDXReadDevice
            for e in try await dev.layerExtents(in: (4 << 20) ..< (8 << 20)) { layer.append(e) }
            XCTAssertEqual(layer.first, Extent(offset: 4 << 20, length: 1 << 20, kind: .unallocated))
            XCTAssertEqual(layer[1], Extent(offset: 5 << 20, length: 8 * 512, kind: .data))
        }
        let out = dir.appendingPathComponent("diff.raw").path
        var options = ConvertOptions()
        options.targetCache = .unsafe
        _ = try await convert(sources: [ImageSpec(child)], target: ImageSpec(out, format: "raw"), options: options)
        let want = dir.appendingPathComponent("want.raw").path
        try Data(expected).write(to: URL(fileURLWithPath: want))
        try Oracle.must("qemu-img", ["compare", "-f", "raw", "-F", "raw", out, want], in: dir)

        // A parent path that leaves the image's folder is refused.
        let escaping = try VHDXOracle.make("escaping.vhdx", size: "64M", options: "block_size=1M", in: dir)
        try VHDXPatcher(path: escaping).makeDifferencing(parent: parent, relative: "..\\base.vhdx")
        await expectError(escaping, .corrupt, "relative_path '..\\base.vhdx' escapes the image's folder at offset")
        let absolute = try VHDXOracle.make("absolute.vhdx", size: "64M", options: "block_size=1M", in: dir)
        try VHDXPatcher(path: absolute).makeDifferencing(parent: parent, relative: "C:\\images\\base.vhdx")
        await expectError(absolute, .corrupt, "escapes the image's folder")
    }

    /// A 64 MiB image whose first MiB is 0x41 and whose log holds one entry: 4 KiB of 0x5c
    /// over guest offset 4 KiB (block 0 is the first data block), stated `entryLength` long.
    func imageWithLogEntry(_ name: String, entryLength: UInt32 = 8192) throws -> String {
        let path = try VHDXOracle.make(name, size: "64M", options: "block_size=1M", writes: ["write -P 0x41 0 1M"], in: dir)
        let p = VHDXPatcher(path: path)
        let h = try p.activeHeader()
        let logOffset = Int64(try p.readU64(at: h + 72))
        let logGuid: [UInt8] = (0 ..< 16).map { UInt8(0x10 + $0) }
        try p.write(logGuid, at: h + 48)
        try p.reseal(h, length: 4096)
        // One entry: a header sector with one data descriptor, and the data sector.
        let block0 = Int64(try p.readU64(at: try p.bat) >> 20) << 20
        let target = block0 + 4096
        let size = UInt64(try FileManager.default.attributesOfItem(atPath: path)[.size] as! Int)
        var entry = [UInt8](repeating: 0, count: 8192)
        func put(_ b: [UInt8], _ at: Int) { for (i, x) in b.enumerated() { entry[at + i] = x } }
        put(Array("loge".utf8), 0)
        put(p.le(UInt64(entryLength), 4), 8)
        put(p.le(0, 4), 12)
        put(p.le(1, 8), 16)
        put(p.le(1, 4), 24)
        put(logGuid, 32)
        put(p.le(size, 8), 48)
        put(p.le(size, 8), 56)
        put(Array("desc".utf8), 64)
        put(p.le(0x5c5c_5c5c, 4), 64 + 4)            // trailing 4 bytes of the sector
        put(p.le(0x5c5c_5c5c_5c5c_5c5c, 8), 64 + 8)   // leading 8 bytes
        put(p.le(UInt64(target), 8), 64 + 16)
        put(p.le(1, 8), 64 + 24)
        put(Array("data".utf8), 4096)
        put(p.le(0, 4), 4096 + 4)
        put([UInt8](repeating: 0x5c, count: 4084), 4096 + 8)
        put(p.le(1, 4), 4096 + 4092)
        put(p.le(UInt64(VHDXCRC.checksum(entry)), 4), 4)
        try p.write(entry, at: logOffset)
        return path
    }

    /// A log that holds an entry not yet replayed: Ferry refuses, and says what to run; once
    /// qemu-img replayed it (which proves the entry valid), Ferry reads the replayed data.
    func testLogNotReplayedIsRefused() async throws {
        let path = try imageWithLogEntry("log.vhdx")
        await expectError(path, .notSupported, "run 'qemu-img check -r all'")
        // qemu-img agrees the log must be replayed...
        let info = try Oracle.run("qemu-img", ["info", path], in: dir)
        XCTAssertNotEqual(info.status, 0, "qemu-img read a log it should replay: \(info.stdout)")
        // ...and once it did, Ferry reads the replayed sector.
        _ = try Oracle.run("qemu-img", ["check", "-r", "all", path], in: dir)
        try await withOpened(path) { image in
            let b = AlignedBuffer(count: 8192)
            try await image.device.read(at: 0, into: b.mutableBytes)
            XCTAssertTrue(b.bytes[0 ..< 4096].allSatisfy { $0 == 0x41 })
            XCTAssertTrue(b.bytes[4096 ..< 8192].allSatisfy { $0 == 0x5c })
        }
        try await checkAgainstQemu(path)
    }

    /// An entry whose length lies (1 GiB, in a 1 MiB log) is no entry: nothing is allocated
    /// or read for it, the log counts as empty, and the image reads as qemu-img reads it,
    /// without the entry's data.
    func testLogEntryWhoseLengthLiesIsNotTakenForOne() async throws {
        let path = try imageWithLogEntry("lie.vhdx", entryLength: 1 << 30)
        try await withOpened(path, format: "vhdx") { image in
            let b = AlignedBuffer(count: 8192)
            try await image.device.read(at: 0, into: b.mutableBytes)
            XCTAssertTrue(b.bytes.allSatisfy { $0 == 0x41 }, "the lying entry's data was read")
        }
        try await checkAgainstQemu(path)
    }

    // MARK: - malformed

    func expectError(_ path: String, _ code: FerryError.Code, _ words: String,
                     file: StaticString = #filePath, line: UInt = #line) async {
        do {
            try await withOpened(path, format: "vhdx") { image in
                _ = try await readAll(image.device)
                try await image.device.forEachExtent(in: 0 ..< image.device.size) { _ in }
            }
            XCTFail("\(path) opened and read without an error", file: file, line: line)
        } catch let e as FerryError {
            XCTAssertEqual(e.code, code, e.description, file: file, line: line)
            XCTAssertEqual(e.path, path, e.description, file: file, line: line)
            XCTAssertTrue(e.description.contains(words), "\(e.description) does not say '\(words)'", file: file, line: line)
            XCTAssertFalse(e.description.contains("\n"), file: file, line: line)
        } catch {
            XCTFail("unexpected error \(error)", file: file, line: line)
        }
    }

    func testBadHeaderChecksums() async throws {
        let path = try VHDXOracle.make("hdr.vhdx", size: "64M", writes: VHDXOracle.writes, in: dir)
        let p = VHDXPatcher(path: path)
        let active = try p.activeHeader()
        let other: Int64 = active == 64 << 10 ? 128 << 10 : 64 << 10
        // One broken: the other is used.
        try p.write([0xde, 0xad], at: active + 200)
        try await checkAgainstQemu(path)
        // Both broken.
        try p.write([0xde, 0xad], at: other + 200)
        await expectError(path, .corrupt, "has no valid header (bad checksum at offset 65536; bad checksum at offset 131072)")
    }

    func testBATEntryPastTheEnd() async throws {
        let path = try VHDXOracle.make("bat.vhdx", size: "64M", writes: VHDXOracle.writes, in: dir)
        let p = VHDXPatcher(path: path)
        let bat = try p.bat
        try p.u64(UInt64(1 << 40) | 6, at: bat + 8)
        await expectError(path, .corrupt, "BAT entry 1 for guest offset 8388608 points to file offset 1099511627776, past the end of the file")
        try p.u64(4, at: bat + 8)
        await expectError(path, .corrupt, "BAT entry 1 has the invalid block state 4")
        // A partially present block in an image without a parent.
        try p.u64(UInt64(3 << 20) | 7, at: bat + 8)
        await expectError(path, .corrupt, "PARTIALLY_PRESENT in an image without a parent")
    }

    func testBadMetadata() async throws {
        let path = try VHDXOracle.make("meta.vhdx", size: "64M", in: dir)
        let p = VHDXPatcher(path: path)
        let params = try p.item(VHDXLayout.fileParameters)
        try p.u32(3 << 20, at: params.at)
        await expectError(path, .corrupt, "block size 3145728 is not a power of two")
        try p.u32(1 << 20, at: params.at)
        let vs = try p.item(VHDXLayout.virtualDiskSize)
        try p.u64(100 << 40, at: vs.at)
        await expectError(path, .corrupt, "virtual disk size 109951162777600")
        try p.u64(64 << 20, at: vs.at)
        try p.u32(9, at: vs.entry + 20)
        await expectError(path, .corrupt, "is 9 bytes, not 8")
        try p.u32(8, at: vs.entry + 20)
        try p.u32(UInt32.max - 4, at: vs.entry + 16)
        await expectError(path, .corrupt, "lies outside the metadata region")
    }

    func testBadRegionTable() async throws {
        let path = try VHDXOracle.make("region.vhdx", size: "64M", in: dir)
        let p = VHDXPatcher(path: path)
        // The BAT region moved past the end of the file, checksums made right.
        for t in [Int64(192 << 10), 256 << 10] {
            let b = VHDXBytes(try p.read(at: t, count: 64 << 10))
            for i in 0 ..< Int(b.u32(8)) where b.guid(16 + i * 32) == VHDXLayout.batRegion {
                try p.u64(1 << 40, at: t + 16 + Int64(i) * 32 + 16)
            }
            try p.reseal(t, length: 64 << 10)
        }
        await expectError(path, .corrupt, "past the end of the file")
    }

    func testTruncatedFile() async throws {
        let path = try VHDXOracle.make("trunc.vhdx", size: "64M", writes: VHDXOracle.writes, in: dir)
        try Patcher(path: path).truncate(to: 200 << 10)
        await expectError(path, .corrupt, "file is truncated: 204800 bytes")
        let cut = try VHDXOracle.make("cut.vhdx", size: "64M", writes: VHDXOracle.writes, in: dir)
        let size = try FileManager.default.attributesOfItem(atPath: cut)[.size] as! Int
        try Patcher(path: cut).truncate(to: Int64(size - (1 << 20)))
        await expectError(cut, .corrupt, "past the end of the file")
    }
}
