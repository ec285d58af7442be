import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// Little-endian fields of VMDK files, to make and break images in known ways.
struct VMDKReadPatcher {
    let path: String

    func write(_ bytes: [UInt8], at offset: Int64) throws { try Patcher(path: path).write(bytes, at: offset) }
    func truncate(to size: Int64) throws { try Patcher(path: path).truncate(to: size) }
    func le(_ value: UInt64, bytes: Int, at offset: Int64) throws {
        try write((0 ..< bytes).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }, at: offset)
    }
    func u32(_ value: UInt32, at offset: Int64) throws { try le(UInt64(value), bytes: 4, at: offset) }
    func u64(_ value: UInt64, at offset: Int64) throws { try le(value, bytes: 8, at: offset) }
    func read(at offset: Int64, count: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        return Array(try h.read(upToCount: count) ?? Data())
    }
    func readLE(at offset: Int64, bytes: Int) throws -> UInt64 {
        try read(at: offset, count: bytes).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// The embedded descriptor of a sparse file: its text and where it lies.
    func descriptor() throws -> (text: String, offset: Int64, size: Int) {
        let offset = Int64(try readLE(at: 28, bytes: 8)) * 512
        let size = Int(try readLE(at: 36, bytes: 8)) * 512
        let raw = try read(at: offset, count: size)
        return (String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self), offset, size)
    }

    /// Rewrites the embedded descriptor (padded with NULs to its room).
    func setDescriptor(_ text: String) throws {
        let d = try descriptor()
        var bytes = Array(text.utf8)
        precondition(bytes.count < d.size)
        bytes += [UInt8](repeating: 0, count: d.size - bytes.count)
        try write(bytes, at: d.offset)
    }
}

enum VMDKReadOracle {
    /// `qemu-img create -f vmdk -o subformat=...`, then qemu-io writes.
    @discardableResult
    static func make(_ name: String, size: String, options: String = "", writes: [String] = [], in dir: URL,
                     file: StaticString = #filePath, line: UInt = #line) throws -> String {
        var args = ["create", "-q", "-f", "vmdk"]
        if !options.isEmpty { args += ["-o", options] }
        try Oracle.must("qemu-img", args + [name, size], in: dir, file: file, line: line)
        try Oracle.io(name, writes, format: "vmdk", in: dir, file: file, line: line)
        return dir.appendingPathComponent(name).path
    }

    /// qemu-img map's runs as extent kinds, joined: data, zero (present) or unallocated. A
    /// flat extent's hole (data and zero) is a zero run.
    static func kinds(_ path: String, in dir: URL) throws -> [Extent] {
        try Oracle.map(path, in: dir).map { e in
            let data = e["data"] as! Bool, zero = e["zero"] as! Bool, present = e["present"] as! Bool
            let kind: ExtentKind = data && !zero ? .data : present ? .zero : .unallocated
            return Extent(offset: (e["start"] as! NSNumber).int64Value, length: (e["length"] as! NSNumber).int64Value, kind: kind)
        }.coalesced()
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

/// Images qemu-img made, of every subformat, read by Ferry and compared with what qemu-img
/// converts them to.
final class VMDKReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vmdk-read") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// Reads `path` whole and walks its extents; both must be what qemu-img says.
    func checkAgainstQemu(_ path: String, file: StaticString = #filePath, line: UInt = #line) async throws {
        let reference = try Oracle.reference(path, in: dir)
        let expected = try VMDKReadOracle.kinds(path, in: dir)
        try await withOpened(path) { image in
            XCTAssertEqual(image.format, "vmdk", file: file, line: line)
            XCTAssertEqual(image.device.size, Int64(reference.count), file: file, line: line)
            let data = try await readAll(image.device, chunk: 300 << 10)
            XCTAssertTrue(data == reference, "\(path): Ferry's bytes differ from qemu-img's", file: file, line: line)
            var extents: [Extent] = []
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { extents.append($0) }
            XCTAssertEqual(extents.coalesced(), expected, "\(path): extents differ from qemu-img map", file: file, line: line)
            XCTAssertTrue(image.device.capabilities.contains(.extents), file: file, line: line)
            XCTAssertFalse(image.device.capabilities.contains(.write), file: file, line: line)
            let one = AlignedBuffer(count: 512)
            do {
                try await image.device.write(at: 0, from: one.bytes, flags: [])
                XCTFail("\(path): a write was accepted", file: file, line: line)
            } catch let e as FerryError {
                XCTAssertEqual(e.code, .readOnly, file: file, line: line)
            }
        }
    }

    func testEverySubformat() async throws {
        for sub in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
            let path = try VMDKReadOracle.make("\(sub).vmdk", size: "64M", options: "subformat=\(sub)",
                                              writes: VMDKReadOracle.writes, in: dir)
            try await checkAgainstQemu(path)
        }
        // qemu-io cannot write a stream out of order: qemu-img converts one.
        let stream = dir.appendingPathComponent("streamOptimized.vmdk").path
        try Oracle.must("qemu-img", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
                                     dir.appendingPathComponent("monolithicSparse.vmdk").path, stream], in: dir)
        try await checkAgainstQemu(stream)
    }

    /// Extents of 2 GiB: reads that cross from one extent file into the next.
    func testTwoGbExtentsAcrossTheBoundary() async throws {
        for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
            let path = try VMDKReadOracle.make("\(sub)-big.vmdk", size: "5G", options: "subformat=\(sub)",
                                              writes: ["write -P 0x55 2047M 2M", "write -P 0x66 4095M 1M"], in: dir)
            try await withOpened(path) { image in
                let buffer = AlignedBuffer(count: 3 << 20)
                try await image.device.read(at: (2047 << 20) - (512 << 10), into: buffer.mutableBytes)
                let b = Array(buffer.bytes)
                XCTAssertEqual(b[0 ..< (512 << 10)].allSatisfy { $0 == 0 }, true)
                XCTAssertEqual(b[(512 << 10) ..< (512 << 10) + (2 << 20)].allSatisfy { $0 == 0x55 }, true)
                XCTAssertEqual(b[((512 << 10) + (2 << 20))...].allSatisfy { $0 == 0 }, true)
            }
        }
    }

    /// A streamOptimized image whose header leaves the grain directory to the footer (as
    /// VMware writes them; qemu-img puts it in the header): the footer is found and used.
    func testStreamOptimizedFooter() async throws {
        let src = try VMDKReadOracle.make("src.vmdk", size: "16M", writes: ["write -P 0x21 0 1M", "write -P 0x22 5M 100k"], in: dir)
        let path = dir.appendingPathComponent("stream.vmdk").path
        try Oracle.must("qemu-img", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, path], in: dir)
        let p = VMDKReadPatcher(path: path)
        let size = (try FileManager.default.attributesOfItem(atPath: path)[.size] as! NSNumber).int64Value
        XCTAssertEqual(try p.read(at: size - 512, count: 512), [UInt8](repeating: 0, count: 512), "no end-of-stream marker")
        let header = try p.read(at: 0, count: 512)
        var marker = [UInt8](repeating: 0, count: 512)
        marker[0] = 1
        marker[12] = 3   // footer
        try p.write(marker + header + [UInt8](repeating: 0, count: 512), at: size - 512)
        try p.u64(UInt64.max, at: 56)
        try await checkAgainstQemu(path)
        try await withOpened(path) { image in
            guard case .object(let top)? = (image.device as? DescribedDevice)?.details.formatSpecific,
                  case .object(let data)? = top.first(where: { $0.0 == "data" })?.1,
                  case .list(let extents)? = data.first(where: { $0.0 == "extents" })?.1,
                  case .object(let first)? = extents.first else { return XCTFail("no format-specific extents") }
            XCTAssertEqual(first.first?.0, "compressed")
            XCTAssertEqual(first.first?.1, .bool(true))
        }
        // Without the footer it cannot be read.
        try p.truncate(to: size - 512)
        do {
            try await withOpened(path) { _ in }
            XCTFail("opened a stream without its footer")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .corrupt)
            XCTAssertTrue(e.description.contains("footer"), e.description)
        }
    }

    func testZeroedGrains() async throws {
        let path = try VMDKReadOracle.make("zg.vmdk", size: "16M", options: "zeroed_grain=on",
                                          writes: ["write -P 0x31 0 1M", "write -z 2M 1M", "write -P 0x32 3M 64k"], in: dir)
        try await checkAgainstQemu(path)
        try await withOpened(path) { image in
            let e = try await image.device.extents(in: (2 << 20) ..< (3 << 20))
            XCTAssertEqual(e.first, Extent(offset: 2 << 20, length: 1 << 20, kind: .zero))
        }
    }

    /// A descriptor written by hand: a flat extent at an offset in its file, a sparse extent.
    func testHandWrittenDescriptor() async throws {
        let flat = dir.appendingPathComponent("part-flat.bin").path
        XCTAssertTrue(FileManager.default.createFile(atPath: flat, contents: Data(repeating: 0x5A, count: 3 << 20)))
        try VMDKReadOracle.make("part-s.vmdk", size: "2M", writes: ["write -P 0x5B 64k 64k"], in: dir)
        func descriptor(_ extents: String) -> String {
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\n"
                + extents + "\n# The Disk Data Base\n#DDB\n"
        }
        let path = dir.appendingPathComponent("hand.vmdk").path
        try descriptor("RW 2048 FLAT \"part-flat.bin\" 2048\nRW 4096 SPARSE \"part-s.vmdk\"\n").write(toFile: path, atomically: true, encoding: .utf8)
        try await checkAgainstQemu(path)
        // A ZERO extent between them. (qemu-img 7.2 skips ZERO lines, which have no file
        // name, so it cannot be the judge here.)
        try descriptor("RW 2048 FLAT \"part-flat.bin\" 2048\nRW 4096 ZERO\nRW 4096 SPARSE \"part-s.vmdk\"\n").write(toFile: path, atomically: true, encoding: .utf8)
        try await withOpened(path) { image in
            XCTAssertEqual(image.device.size, 5 << 20)
            let data = try await readAll(image.device)
            XCTAssertTrue(data[0 ..< (1 << 20)].allSatisfy { $0 == 0x5A })
            XCTAssertTrue(data[(1 << 20) ..< (3 << 20)].allSatisfy { $0 == 0 })
            XCTAssertTrue(data[((3 << 20) + (64 << 10)) ..< ((3 << 20) + (128 << 10))].allSatisfy { $0 == 0x5B })
            let e = try await image.device.extents(in: (1 << 20) ..< (3 << 20))
            XCTAssertEqual(e.first, Extent(offset: 1 << 20, length: 2 << 20, kind: .zero))
        }
    }

    /// A COWD (vmfsSparse) extent made by hand: 1 MiB, 4 KiB grains, one grain table of 4096
    /// entries, grains 3 (0xC3) and 200 (0xC4), the CIDs as text in the sector after the
    /// header (where qemu-img wants them).
    static func makeCOWD(_ path: String) {
        var file = [UInt8](repeating: 0, count: 40 * 512 + 2 * 4096)
        func put(_ v: UInt32, _ at: Int) { for i in 0 ..< 4 { file[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
        put(0x4457_4F43, 0); put(1, 4); put(3, 8)
        put(2048, 12)       // 1 MiB
        put(8, 16)          // 4 KiB grains
        put(4, 20); put(1, 24)
        put(UInt32(file.count / 512), 28)
        file.replaceSubrange(512 ..< 544, with: Array("CID=fffffffe\nparentCID=ffffffff\n".utf8))
        put(8, 4 * 512)     // directory entry 0: the table at sector 8
        put(40, 8 * 512 + 3 * 4)    // grain 3 at sector 40
        put(48, 8 * 512 + 200 * 4)  // grain 200 at sector 48
        for i in 0 ..< 4096 { file[40 * 512 + i] = 0xC3; file[48 * 512 + i] = 0xC4 }
        _ = FileManager.default.createFile(atPath: path, contents: Data(file))
    }

    func testCOWDExtent() async throws {
        let path = dir.appendingPathComponent("cowd.vmdk").path
        Self.makeCOWD(path)
        try await checkAgainstQemu(path)
        try await withOpened(path) { image in
            let data = try await readAll(image.device)
            XCTAssertEqual(data[3 * 4096], 0xC3)
            XCTAssertEqual(data[200 * 4096 + 4095], 0xC4)
            XCTAssertEqual(data[4 * 4096], 0)
        }
    }

    /// ESX descriptors: a VMFS (flat) extent, and a VMFSSPARSE (COWD) extent.
    func testVMFSDescriptors() async throws {
        Self.makeCOWD(dir.appendingPathComponent("disk-delta.vmdk").path)
        let flat = dir.appendingPathComponent("disk-flat.vmdk").path
        XCTAssertTrue(FileManager.default.createFile(atPath: flat, contents: Data(repeating: 0x6B, count: 1 << 20)))
        for (name, type, extent) in [("vmfs.vmdk", "vmfs", "RW 2048 VMFS \"disk-flat.vmdk\""),
                                     ("delta.vmdk", "vmfsSparse", "RW 2048 VMFSSPARSE \"disk-delta.vmdk\""),
                                     ("tabs.vmdk", "vmfs", "RW\t2048\tVMFS \"disk-flat.vmdk\"")] {
            let path = dir.appendingPathComponent(name).path
            try "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"\(type)\"\n\n# Extent description\n\(extent)\n\n# The Disk Data Base\n#DDB\n"
                .write(toFile: path, atomically: true, encoding: .utf8)
            try await checkAgainstQemu(path)
        }
    }

    func testParentChain() async throws {
        let base = try VMDKReadOracle.make("base.vmdk", size: "16M", writes: ["write -P 0x41 0 8M"], in: dir)
        try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "top.vmdk"], in: dir)
        try Oracle.io("top.vmdk", ["write -P 0x42 1M 1M"], format: "vmdk", in: dir)
        let top = dir.appendingPathComponent("top.vmdk").path
        try await checkAgainstQemu(top)
        try await withOpened(top) { image in
            guard let layered = image.device as? LayeredDevice else { return XCTFail("not layered") }
            XCTAssertEqual(layered.backing?.name, base)
            let own = try await layered.layerExtents(in: 0 ..< (16 << 20))
            XCTAssertEqual(own.first, Extent(offset: 0, length: 1 << 20, kind: .unallocated))
            XCTAssertEqual(own.dropFirst().first, Extent(offset: 1 << 20, length: 1 << 20, kind: .data))
            XCTAssertFalse(image.device.capabilities.contains(.cheapZeroReads) && !layered.backing!.capabilities.contains(.cheapZeroReads))
            let d = (image.device as? DescribedDevice)?.details
            XCTAssertEqual(d?.backingFilename, "base.vmdk")
            XCTAssertEqual(d?.backingFormat, "vmdk")
        }
    }

    /// qemu-img 7.2 opens an overlay whose parent's CID changed, but fails reads that fall
    /// through to the parent; reads of the overlay's own grains still work.
    func testParentCIDMismatch() async throws {
        let base = try VMDKReadOracle.make("base.vmdk", size: "16M", writes: ["write -P 0x41 0 8M"], in: dir)
        try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "top.vmdk"], in: dir)
        try Oracle.io("top.vmdk", ["write -P 0x42 1M 1M"], format: "vmdk", in: dir)
        let top = dir.appendingPathComponent("top.vmdk").path
        let p = VMDKReadPatcher(path: base)
        let text = try p.descriptor().text
        let cid = text.split(separator: "\n").first { $0.hasPrefix("CID=") }!
        try p.setDescriptor(text.replacingOccurrences(of: String(cid), with: cid == "CID=00000001" ? "CID=00000002" : "CID=00000001"))
        try await expectCIDMismatch(top)
        // parentCID ffffffff with a parent named: qemu-img opens the parent all the same, and
        // fails reads through it.
        try p.setDescriptor(text)
        let q = VMDKReadPatcher(path: top)
        let topText = try q.descriptor().text
        let parentCID = topText.split(separator: "\n").first { $0.hasPrefix("parentCID=") }!
        try q.setDescriptor(topText.replacingOccurrences(of: String(parentCID), with: "parentCID=ffffffff"))
        try await expectCIDMismatch(top)
    }

    func expectCIDMismatch(_ top: String, file: StaticString = #filePath, line: UInt = #line) async throws {
        XCTAssertFalse(try Oracle.run("qemu-io", ["-r", "-c", "read 0 4k", top], in: dir).stdout.contains("read 4096/4096"),
                       "qemu-io reads through a parent of another CID", file: file, line: line)
        try await withOpened(top) { image in
            let buffer = AlignedBuffer(count: 64 << 10)
            try await image.device.read(at: 1 << 20, into: buffer.mutableBytes)
            XCTAssertEqual(buffer.bytes[0], 0x42, file: file, line: line)
            do {
                try await image.device.read(at: 0, into: buffer.mutableBytes)
                XCTFail("read through a parent with another CID", file: file, line: line)
            } catch let e as FerryError {
                XCTAssertEqual(e.code, .corrupt, file: file, line: line)
                XCTAssertTrue(e.description.contains("CID"), e.description, file: file, line: line)
            }
        }
    }

    /// Two images that name each other as parent: refused, not followed forever.
    func testParentLoopIsRefused() async throws {
        let a = try VMDKReadOracle.make("a.vmdk", size: "4M", in: dir)
        try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "-b", "a.vmdk", "-F", "vmdk", "b.vmdk"], in: dir)
        let b = dir.appendingPathComponent("b.vmdk").path
        let bText = try VMDKReadPatcher(path: b).descriptor().text
        let bCID = bText.split(separator: "\n").first { $0.hasPrefix("CID=") }!.dropFirst(4)
        let p = VMDKReadPatcher(path: a)
        let aText = try p.descriptor().text
        try p.setDescriptor(aText.replacingOccurrences(of: "parentCID=ffffffff", with: "parentCID=\(bCID)\nparentFileNameHint=\"b.vmdk\""))
        do {
            try await withOpened(b) { _ in }
            XCTFail("a loop of parents was opened")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .corrupt)
            XCTAssertTrue(e.description.contains("loops"), e.description)
        }
    }

    /// A 1 TiB image with a few MiB written: extents walk the grain directory in few calls.
    func testTerabyteSparseExtents() async throws {
        let path = try VMDKReadOracle.make("tb.vmdk", size: "1T", writes: ["write -P 0x71 0 1M", "write -P 0x72 700G 2M"], in: dir)
        try await withOpened(path) { image in
            var calls = 0
            var pos: Int64 = 0
            var data: Int64 = 0
            while pos < image.device.size {
                let batch = try await image.device.extents(in: pos ..< image.device.size)
                calls += 1
                for e in batch where e.kind == .data { data += e.length }
                pos = batch.last!.end
            }
            XCTAssertLessThanOrEqual(calls, 4)
            XCTAssertEqual(data, 3 << 20)
            // qemu-img writes every grain table at creation: each is read once, many a call.
            XCTAssertLessThanOrEqual((image.device as! VMDKReadDevice).grainTablesLoaded, 32768)
        }
    }
}
