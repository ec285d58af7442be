import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// Big-endian fields of VHD files, with their checksums kept right, to make and break images.
struct VHDPatcher {
    let path: String
    var p: Patcher { Patcher(path: path) }

    func read(at offset: Int64, count: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        return Array(try h.read(upToCount: count) ?? Data())
    }
    var size: Int64 { (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)??.int64Value ?? 0 }

    /// Recomputes the checksum of the 512-byte footer (field at 64) or 1024-byte header (36) at `offset`.
    func fixChecksum(at offset: Int64, length: Int, field: Int) throws {
        var b = try read(at: offset, count: length)
        b.replaceSubrange(field ..< field + 4, with: [0, 0, 0, 0])
        let sum = ~b.reduce(UInt32(0)) { $0 &+ UInt32($1) }
        try p.u32(sum, at: offset + Int64(field))
    }

    /// Changes the footer (both copies for a dynamic disk) and fixes its checksums.
    func editFooter(_ change: (Patcher, Int64) throws -> Void) throws {
        var places = [size - 512]
        if try read(at: 0, count: 8) == Array("conectix".utf8) && size > 512 { places.append(0) }
        for at in places {
            try change(p, at)
            try fixChecksum(at: at, length: 512, field: 64)
        }
    }
    func editHeader(_ change: (Patcher, Int64) throws -> Void) throws {
        try change(p, 512)
        try fixChecksum(at: 512, length: 1024, field: 36)
    }
}

enum VHDOracle {
    @discardableResult
    static func make(_ name: String, size: String, options: String = "", writes: [String] = [], in dir: URL) throws -> String {
        var args = ["create", "-q", "-f", "vpc"]
        if !options.isEmpty { args += ["-o", options] }
        try Oracle.must("qemu-img", args + [name, size], in: dir)
        try Oracle.io(name, writes, format: "vpc", in: dir)
        return dir.appendingPathComponent(name).path
    }

    /// The guest bytes as qemu-img reads them (`-f vpc`: fixed disks do not probe).
    static func reference(_ path: String, in dir: URL) throws -> Data {
        let out = dir.appendingPathComponent("reference-\(UUID().uuidString.prefix(8)).raw").path
        try Oracle.must("qemu-img", ["convert", "-f", "vpc", "-O", "raw", path, out], in: dir)
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try Data(contentsOf: URL(fileURLWithPath: out))
    }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -P 0x22 5243392 3584", "write -P 0x44 20M 1M"]

    /// Makes `name` (a dynamic disk of `size`, block 0 written with 0x22 by qemu) a
    /// differencing disk over `parent`: footer type 4, a W2ru locator with `locator`
    /// appended before a new footer, and block 0's bitmap keeping only its first 512 KiB.
    static func differencing(_ name: String, parent locator: String, size: String, in dir: URL) throws -> String {
        let path = try make(name, size: size, writes: ["write -P 0x22 0 1M"], in: dir)
        let v = VHDPatcher(path: path)
        let footer = try v.read(at: v.size - 512, count: 512)
        let end = v.size - 512
        var data = [UInt8]()
        for u in locator.utf16 { data += [UInt8(u & 0xff), UInt8(u >> 8)] }
        let padded = data + [UInt8](repeating: 0, count: 512 - data.count)
        try v.p.write(padded + footer, at: end)
        try v.editFooter { p, at in try p.u32(4, at: at + 60) }
        try v.editHeader { p, at in
            try p.write(Array("W2ru".utf8), at: at + 576)
            try p.u32(512, at: at + 580)
            try p.u32(UInt32(data.count), at: at + 584)
            try p.u64(UInt64(end), at: at + 592)
        }
        let batOffset = Int64(try v.p.readU64(at: 512 + 16))
        let block0 = Int64(try v.p.readU32(at: batOffset)) * 512
        try v.p.write([UInt8](repeating: 0xFF, count: 128) + [UInt8](repeating: 0, count: 384), at: block0)
        return path
    }
}

/// Images qemu-img made, read by Ferry and compared with what qemu-img reads.
final class VHDReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vhd-read") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func testDynamicAndFixedReadAsQemuReads() async throws {
        for (name, options) in [("d.vhd", ""), ("f.vhd", "subformat=fixed"), ("fs.vhd", "force_size=on"), ("ffs.vhd", "subformat=fixed,force_size=on")] {
            let path = try VHDOracle.make(name, size: "37M", options: options, writes: VHDOracle.writes, in: dir)
            let expected = try VHDOracle.reference(path, in: dir)
            let got = try await withOpened(path, format: "vpc") { image -> Data in
                XCTAssertEqual(image.format, "vpc")
                return try await readAll(image.device, chunk: 300_000)
            }
            XCTAssertEqual(got.count, expected.count, name)
            XCTAssertTrue(got == expected, "\(name): bytes differ from qemu-img's")
        }
    }

    func testSparseDynamicExtentsFollowTheBAT() async throws {
        let path = try VHDOracle.make("s.vhd", size: "1G", writes: ["write -P 1 4M 4k", "write -P 2 700M 1M"], in: dir)
        try await withOpened(path) { image in
            var data: [Extent] = []
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { if $0.kind == .data { data.append($0) } }
            XCTAssertEqual(data.map(\.range), [(4 << 20) ..< (6 << 20), (700 << 20) ..< (702 << 20)])
        }
    }

    func testCreatorDecidesBetweenGeometryAndCurrentSize() async throws {
        // force_size: exact current size, geometry giving a little more; qemu-img trusts the
        // current size only from some creators.
        for (creator, trusted) in [("qem2", true), ("win ", true), ("qemu", false), ("vpc ", false)] {
            let path = try VHDOracle.make("c.vhd", size: "100M", options: "subformat=fixed,force_size=on", in: dir)
            try VHDPatcher(path: path).editFooter { p, at in
                try p.write(Array(creator.utf8), at: at + 28)
                try p.write([0x03, 0xec, 0x0c, 0x11], at: at + 56)
            }
            let size = try await withOpened(path, format: "vpc") { $0.device.size }
            let qemu = try Oracle.must("qemu-img", ["info", "-f", "vpc", "--output=json", path], in: dir)
            XCTAssertTrue(qemu.contains("\"virtual-size\": \(size),"), "\(creator): \(size) vs \(qemu)")
            XCTAssertEqual(size, trusted ? 104_857_600 : 104_865_792, creator)
            try FileManager.default.removeItem(atPath: path)
        }
    }

    func testDifferencingDiskReadsThroughItsParent() async throws {
        let parent = try VHDOracle.make("parent.vhd", size: "8M", writes: ["write -P 0x11 0 8M"], in: dir)
        _ = parent
        let child = try VHDOracle.differencing("child.vhd", parent: ".\\parent.vhd", size: "8M", in: dir)
        let got = try await withOpened(child) { image -> Data in
            XCTAssertNotNil((image.device as? LayeredDevice)?.backing)
            return try await readAll(image.device, chunk: 100_000)
        }
        var expected = Data(repeating: 0x11, count: Int(got.count))
        expected.replaceSubrange(0 ..< (512 << 10), with: Data(repeating: 0x22, count: 512 << 10))
        // qemu-io wrote the parent's first 8 MiB; its CHS size is 2 KiB more.
        expected.replaceSubrange((8 << 20) ..< expected.count, with: Data(count: expected.count - (8 << 20)))
        XCTAssertEqual(got.count, 8_390_656)
        let firstDiff = zip(got, expected).enumerated().first { $0.element.0 != $0.element.1 }
        XCTAssertNil(firstDiff.map { "\($0.offset): \($0.element.0)" }, "differencing disk does not read as parent + its own sectors")
    }
}

/// VHD images broken in known places: one clear error naming the file.
final class VHDReadMalformedTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vhd-bad") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func expectError(_ path: String, _ code: FerryError.Code, _ words: String, file: StaticString = #filePath, line: UInt = #line) async {
        do {
            try await withOpened(path, format: "vpc") { image in
                _ = try await readAll(image.device)
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

    func image() throws -> (String, VHDPatcher) {
        let path = try VHDOracle.make("bad.vhd", size: "8M", writes: ["write -P 1 0 64k", "write -P 2 4M 64k"], in: dir)
        return (path, VHDPatcher(path: path))
    }

    func testBadFooterChecksum() async throws {
        let (path, v) = try image()
        try v.p.write([0x7f], at: v.size - 512 + 40)
        await expectError(path, .corrupt, "vhd footer checksum mismatch")
    }

    func testBadHeaderChecksum() async throws {
        let (path, v) = try image()
        try v.p.write([0x7f], at: 512 + 700)
        await expectError(path, .corrupt, "dynamic disk header checksum mismatch (stored")
    }

    func testBATEntryPastTheEnd() async throws {
        let (path, v) = try image()
        let bat = Int64(try v.p.readU64(at: 512 + 16))
        try v.p.u32(0x0100_0000, at: bat + 4)
        await expectError(path, .corrupt, "vhd BAT entry 1 (block at offset 8589934592) lies past the end of the file")
    }

    func testBlockSizeNotAPowerOfTwo() async throws {
        let (path, v) = try image()
        try v.editHeader { p, at in try p.u32(3 << 20, at: at + 32) }
        await expectError(path, .corrupt, "vhd block size 3145728 in the dynamic disk header at offset 512 is not a power of two")
    }

    func testHugeTableClaimIsRefusedNotAllocated() async throws {
        let (path, v) = try image()
        try v.editFooter { p, at in try p.u64(1 << 50, at: at + 48); try p.write(Array("qem2".utf8), at: at + 28) }
        try v.editHeader { p, at in try p.u32(0xFFFF_FFF0, at: at + 28) }
        await expectError(path, .corrupt, "vhd block allocation table at offset")
    }

    func testParentEscapingWithDotDot() async throws {
        _ = try VHDOracle.make("parent.vhd", size: "8M", in: dir)
        let child = try VHDOracle.differencing("child.vhd", parent: "..\\..\\etc\\parent.vhd", size: "8M", in: dir)
        await expectError(child, .corrupt, "vhd parent path '..\\..\\etc\\parent.vhd' escapes the image's directory")
    }

    func testAbsoluteParentRefused() async throws {
        let child = try VHDOracle.differencing("child.vhd", parent: "C:\\vms\\parent.vhd", size: "8M", in: dir)
        await expectError(child, .corrupt, "is absolute")
    }

    func testTruncatedFile() async throws {
        let (path, v) = try image()
        try v.p.truncate(to: 3 << 20)
        // The footer at the end is gone; the copy at 0 still names a BAT whose blocks are past the end.
        await expectError(path, .corrupt, "lies past the end of the file")
        try v.p.truncate(to: 100)
        await expectError(path, .corrupt, "vhd image is truncated: 100 bytes")
    }
}
