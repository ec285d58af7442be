import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// VDI images: qemu-img's read as qemu-img reads them, Ferry's written in parallel with
/// nothing that reads as a VDI before the commit, broken ones refused with one clear line.
final class VDITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vdi") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    @discardableResult
    func make(_ name: String, size: String, options: String = "", writes: [String] = []) throws -> String {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "vdi"] + (options.isEmpty ? [] : ["-o", options]) + [name, size], in: dir)
        try Oracle.io(name, writes, format: "vdi", in: dir)
        return path(name)
    }

    func reference(_ image: String) throws -> Data {
        let out = path("reference.raw")
        try Oracle.must("qemu-img", ["convert", "-f", "vdi", "-O", "raw", image, out], in: dir)
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try Data(contentsOf: URL(fileURLWithPath: out))
    }

    func le32(_ v: UInt32, at offset: Int64, in image: String) throws {
        try Patcher(path: image).write((0 ..< 4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) }, at: offset)
    }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 6M 1M", "write -P 0x22 5243392 3584", "write -P 0x44 20M 1M"]

    func testDynamicAndStaticReadAsQemuReads() async throws {
        for (name, options) in [("d.vdi", ""), ("s.vdi", "static=on")] {
            let image = try make(name, size: "37M", options: options, writes: Self.writes)
            let expected = try reference(image)
            let got = try await withOpened(image) { opened -> Data in
                XCTAssertEqual(opened.format, "vdi")
                return try await readAll(opened.device, chunk: 300_000)
            }
            XCTAssertEqual(got.count, expected.count, name)
            XCTAssertTrue(got == expected, "\(name): bytes differ from qemu-img's")
        }
    }

    /// Free blocks are holes; blocks qemu allocated one after another in the file are one run.
    func testSparseDynamicExtentsFollowTheBlockMap() async throws {
        let image = try make("sp.vdi", size: "1G", writes: ["write -P 1 4M 4k", "write -P 2 5M 1M", "write -P 3 700M 1M"])
        try await withOpened(image) { opened in
            var data: [Extent] = []
            try await opened.device.forEachExtent(in: 0 ..< opened.device.size) { if $0.kind == .data { data.append($0) } }
            XCTAssertEqual(data.map(\.range), [(4 << 20) ..< (6 << 20), (700 << 20) ..< (701 << 20)])
        }
    }

    /// A zero entry (0xfffffffe, which VirtualBox writes and qemu does not) reads as zeros,
    /// as a free one does, and is a hole.
    func testZeroBlockEntryReadsAsZeros() async throws {
        let image = try make("z.vdi", size: "4M", writes: ["write -P 1 0 2M"])
        try le32(0xffff_fffe, at: 0x200 + 4, in: image)
        try await withOpened(image) { opened in
            let got = try await readAll(opened.device)
            XCTAssertEqual(got.prefix(1 << 20), Data(repeating: 1, count: 1 << 20))
            XCTAssertEqual(got.suffix(from: 1 << 20), Data(count: 3 << 20))
            var data: [Extent] = []
            try await opened.device.forEachExtent(in: 0 ..< opened.device.size) { if $0.kind == .data { data.append($0) } }
            XCTAssertEqual(data.map(\.range), [0 ..< (1 << 20)])
        }
        XCTAssertTrue(try reference(image).prefix(2 << 20).suffix(1 << 20) == Data(count: 1 << 20), "qemu-img reads the zero block as zeros too")
    }

    func testBadOptionsAreRefused() {
        XCTAssertThrowsError(try VDIFormat.checkOptions(["static": "maybe"]))
        XCTAssertNoThrow(try VDIFormat.checkOptions(["static": "on"]))
        XCTAssertThrowsError(try VDIFormat.initialFileSize(for: 2 << 50, options: [:]))
    }

    func exercise(_ options: [String: String], size: Int64, seed: UInt64) async throws {
        let name = path("w.vdi")
        let f = MemoryDevice(name: name, size: try VDIFormat.initialFileSize(for: size, options: options))
        let w = try await VDIFormat.create(file: f, size: size, options: options, context: CreateContext(location: name))
        let c = try XCTUnwrap(w as? CommittingDevice)
        var rng = SplitMix(seed: seed)
        var reference = [UInt8](repeating: 0, count: Int(w.size))
        var writes: [(Int64, [UInt8])] = []
        for step in 0 ..< 30 {
            let offset = Int64(rng.next() % UInt64(w.size))
            let length = min(Int64(rng.next() % (3 << 20)) + 1, w.size - offset)
            let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: step * 7 + 1), count: Int(length))
            writes.append((offset, bytes))
            reference.replaceSubrange(Int(offset) ..< Int(offset + length), with: bytes)
        }
        for (offset, bytes) in writes { try await w.write(at: offset, bytes: bytes) }
        // Parallel writes of disjoint blocks (allocation races).
        try await withThrowingTaskGroup(of: Void.self) { group in
            for k in 0 ..< 8 {
                let offset = Int64(k) * (3 << 20) + 4096
                guard offset + 65536 <= w.size else { continue }
                let bytes = [UInt8](repeating: UInt8(0xA0 + k), count: 65536)
                reference.replaceSubrange(Int(offset) ..< Int(offset) + 65536, with: bytes)
                group.addTask { try await w.write(at: offset, bytes: bytes) }
            }
            try await group.waitForAll()
        }
        let back = AlignedBuffer(count: Int(w.size))
        try await w.read(at: 0, into: back.mutableBytes)
        XCTAssertTrue(Array(back.bytes) == reference, "writer read-back differs \(options)")
        // Before the commit: nothing qemu-img or Ferry takes for a VDI image.
        try Data(f.contents()).write(to: URL(fileURLWithPath: name))
        let early = try Oracle.run("qemu-img", ["info", "-f", "vdi", name], in: dir)
        XCTAssertNotEqual(early.status, 0, "uncommitted image reads as vdi: \(early.stdout)")
        try await c.commit(durable: true)
        try Data(f.contents().prefix(Int(c.usedFileSize))).write(to: URL(fileURLWithPath: name))
        let check = try Oracle.run("qemu-img", ["check", "-f", "vdi", name], in: dir)
        XCTAssertEqual(check.status, 0, "\(options): \(check.stdout) \(check.stderr)")
        let ref = path("ref.raw")
        try Data(reference).write(to: URL(fileURLWithPath: ref))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "vdi", ref, name], in: dir)
        XCTAssertEqual(cmp.status, 0, "\(options): \(cmp.stdout) \(cmp.stderr)")
        let got = try await withOpened(name) { try await readAll($0.device) }
        XCTAssertTrue(got.prefix(reference.count) == Data(reference), "\(options): Ferry reads back other bytes")
        try await w.close()
    }

    func testDynamicRandomWrites() async throws {
        try await exercise([:], size: 40 << 20, seed: 1)
        try await exercise([:], size: (40 << 20) + 1000, seed: 3)
    }

    func testStaticRandomWrites() async throws {
        try await exercise(["static": "on"], size: 24 << 20, seed: 2)
    }

    // MARK: - Broken images

    func expectError(_ image: String, _ code: FerryError.Code, _ words: String, file: StaticString = #filePath, line: UInt = #line) async {
        do {
            try await withOpened(image, format: "vdi") { opened in _ = try await readAll(opened.device) }
            XCTFail("\(image) opened and read without an error", file: file, line: line)
        } catch let e as FerryError {
            XCTAssertEqual(e.code, code, e.description, file: file, line: line)
            XCTAssertEqual(e.path, image, e.description, file: file, line: line)
            XCTAssertTrue(e.description.contains(words), "\(e.description) does not say '\(words)'", file: file, line: line)
            XCTAssertFalse(e.description.contains("\n"), file: file, line: line)
        } catch {
            XCTFail("unexpected error \(error)", file: file, line: line)
        }
    }

    func broken() throws -> String {
        try make("bad.vdi", size: "8M", writes: ["write -P 1 0 64k", "write -P 2 4M 64k"])
    }

    func testBadSignature() async throws {
        let image = try broken()
        try le32(0x1234_5678, at: 0x40, in: image)
        await expectError(image, .corrupt, "no vdi signature (0xbeda107f) at offset 0x40")
    }

    func testOtherVersionRefused() async throws {
        let image = try broken()
        try le32(0x0001_0000, at: 0x44, in: image)
        await expectError(image, .notSupported, "vdi version 1.0 is not supported (only 1.1)")
    }

    func testBlockMapPastTheEnd() async throws {
        let image = try broken()
        try le32(0x0100_0000, at: 0x154, in: image)
        await expectError(image, .corrupt, "vdi block map at offset 16777216 (32 bytes, header at offset 0x154) is past the end of the file")
    }

    func testBlockIndexOutOfRange() async throws {
        let image = try broken()
        try le32(8, at: 0x200 + 4, in: image)
        await expectError(image, .corrupt, "vdi block map entry 1 (block 8) at offset 516 is out of range (8 blocks)")
    }

    func testBlockSizes() async throws {
        for bs: UInt32 in [0, 1000, 1 << 30] {
            let image = try broken()
            try le32(bs, at: 0x178, in: image)
            await expectError(image, .corrupt, "vdi block size \(bs) at offset 0x178 is not a power of two")
        }
    }

    func testDiskSizeLargerThanItsBlocks() async throws {
        let image = try broken()
        try le32(9 << 20, at: 0x170, in: image)
        await expectError(image, .corrupt, "vdi disk size 9437184 at offset 0x170 is larger than its 8 blocks of 1048576 bytes")
    }

    func testTruncatedFile() async throws {
        let image = try broken()
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: image))
        try h.truncate(atOffset: 1 << 20)
        try h.close()
        await expectError(image, .corrupt, "lies past the end of the file (1048576 bytes)")
        let h2 = try FileHandle(forUpdating: URL(fileURLWithPath: image))
        try h2.truncate(atOffset: 200)
        try h2.close()
        await expectError(image, .corrupt, "vdi image is truncated: 200 bytes")
    }

    func testDifferencingImageRefused() async throws {
        let image = try broken()
        try le32(4, at: 0x4c, in: image)
        await expectError(image, .notSupported, "vdi image type 4 at offset 0x4c is not supported")
    }
}
