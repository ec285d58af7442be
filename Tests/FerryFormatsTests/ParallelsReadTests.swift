import FerryConvert
import FerryCore
@testable import FerryFormats
import Foundation
import XCTest

/// Parallels images made by qemu-img (and from them, by rewriting the header, the older
/// "WithoutFreeSpace" kind), read by Ferry and compared with what qemu-img reads; then broken
/// in known ways.
final class ParallelsReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("parallels") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -P 0 6M 64k", "write -P 0x22 9M 512"]

    /// A qemu-made image: `cluster_size` (empty for the default 1 MiB), the writes above.
    func make(_ name: String, size: String = "10M", clusterSize: String = "", writes: [String] = writes) throws -> String {
        var args = ["create", "-q", "-f", "parallels"]
        if !clusterSize.isEmpty { args += ["-o", "cluster_size=\(clusterSize)"] }
        try Oracle.must("qemu-img", args + [name, size], in: dir)
        try Oracle.io(name, writes, format: "parallels", in: dir)
        return dir.appendingPathComponent(name).path
    }

    /// Ferry's bytes and data extents of `path` against qemu-img's.
    func checkAgainstQemu(_ path: String, file: StaticString = #filePath, line: UInt = #line) async throws {
        let expected = try Oracle.reference(path, in: dir)
        let (data, extents, format) = try await withOpened(path) { image in
            (try await readAll(image.device), try await image.device.extents(in: 0 ..< image.device.size), image.format)
        }
        XCTAssertEqual(format, "parallels", file: file, line: line)
        XCTAssertEqual(data.count, expected.count, "size of \(path)", file: file, line: line)
        XCTAssertTrue(data == expected, "bytes of \(path) differ from qemu-img's", file: file, line: line)
        let qemuData = try Oracle.map(path, in: dir).filter { $0["data"] as? Bool == true }
            .map { ($0["start"] as? Int64 ?? -1, $0["length"] as? Int64 ?? -1) }
        let ours = extents.filter { $0.kind == .data }.map { ($0.offset, $0.length) }
        XCTAssertEqual(ours.map { "\($0.0)+\($0.1)" }, qemuData.map { "\($0.0)+\($0.1)" }, "data runs of \(path)", file: file, line: line)
    }

    func testReadsQemuImages() async throws {
        try await checkAgainstQemu(try make("default.img"))
        try await checkAgainstQemu(try make("c64k.img", clusterSize: "64k"))
        try await checkAgainstQemu(try make("c4k.img", clusterSize: "4k"))
        try await checkAgainstQemu(try make("c512.img", size: "3M", clusterSize: "512", writes: ["write -P 0x5a 1000 3000", "write -P 7 2M 1k"]))
        // A size that is not a whole number of clusters.
        try await checkAgainstQemu(try make("odd.img", size: "10000896", writes: ["write -P 0x33 9M 563712"]))
        try await checkAgainstQemu(try make("empty.img", writes: []))
    }

    /// The older kind: BAT entries in sectors, 32-bit sector count, magic "WithoutFreeSpace".
    func testReadsWithoutFreeSpaceImages() async throws {
        let path = try make("old.img", clusterSize: "64k")
        let expected = try Oracle.reference(path, in: dir)
        let p = VHDXPatcher(path: path)
        let entries = Int(try p.readU32(at: 32)), tracks = try p.readU32(at: 28)
        for i in 0 ..< entries {
            let e = try p.readU32(at: Int64(64 + i * 4))
            try p.u32(e * tracks, at: Int64(64 + i * 4))
        }
        try p.write(Array("WithoutFreeSpace".utf8), at: 0)
        XCTAssertTrue(try Oracle.reference(path, in: dir) == expected, "qemu-img reads the rewritten image as before")
        try await checkAgainstQemu(path)
        // data_off 0: the data area starts after the BAT.
        try p.u32(0, at: 48)
        try await checkAgainstQemu(path)
    }

    /// An image left open for writing is read as its BAT says (as qemu-img reads it), with a
    /// warning.
    func testInUseImageIsReadWithAWarning() async throws {
        let path = try make("inuse.img")
        let expected = try Oracle.reference(path, in: dir)
        try VHDXPatcher(path: path).u32(ParallelsHeader.inUseOpen, at: 44)
        try await checkAgainstQemu(path)
        let warnings = try await Images.info(ImageSpec(path)).warnings
        XCTAssertTrue(warnings.contains { $0.contains("not closed cleanly") }, "\(warnings)")
        let data = try await withOpened(path) { try await readAll($0.device) }
        XCTAssertTrue(data == expected)
    }

    func testReadsClustersContiguousInTheFileTogether() async throws {
        let path = try make("runs.img", clusterSize: "64k", writes: ["write -P 1 0 256k", "write -P 2 1M 64k"])
        let device = try await withOpened(path) { image -> [HostRun] in
            let d = try XCTUnwrap(image.device as? ParallelsDevice)
            return await d.runs(in: 0 ..< d.size)
        }
        // Four clusters written in order are one run in the file.
        XCTAssertEqual(device.first?.length, 256 << 10)
        XCTAssertNotNil(device.first?.host)
    }

    // MARK: - Malformed

    func testMalformedImages() async throws {
        // Each case: a 64 KiB-cluster image, little-endian fields written into it (or the file
        // cut to a length), and the words of the one-line error.
        let cases: [(String, [(Int64, UInt64, Int)], Int64?, String)] = [
            ("magic", [(12, 0x5870_6361, 4)], nil, "bad magic"),
            ("version", [(16, 3, 4)], nil, "version 3"),
            ("cluster0", [(28, 0, 4)], nil, "cluster size of 0 sectors"),
            ("clusterhuge", [(28, 0xFFFF_FFFF, 4)], nil, "cluster size of 4294967295 sectors is out of range"),
            ("sectors", [(36, 161 * 128, 8)], nil, "needs 161 clusters"),   // one more than the BAT's 160
            ("batcount", [(32, 0x4000_0000, 4)], nil, "past the end of the file"),
            ("batpast", [(64, 0x00FF_FFFF, 4)], nil, "BAT entry 0 points to file offset"),
            ("dataoff0", [(48, 0, 4)], nil, "data_off is 0"),   // not allowed in "WithouFreSpacExt"
            ("overlap", [(48, 1, 4)], nil, "overlaps the BAT"),   // data area at 512, inside the BAT
            ("inuse", [(44, 0x1234_5678, 4)], nil, "in_use field holds the invalid value 0x12345678"),
            ("before", [(72, 1, 4), (48, 256, 4)], nil, "before the data area"),
            ("truncated", [], 40, "header is truncated"),
            ("cut", [], 70 << 10, "past the end of the file"),   // clusters from 128 KiB on are gone
        ]
        for (name, fields, cut, words) in cases {
            let path = try make("\(name).img", clusterSize: "64k")
            let p = VHDXPatcher(path: path)
            for (at, value, n) in fields { try p.write(p.le(value, n), at: at) }
            if let cut { try Patcher(path: path).truncate(to: cut) }
            await expectReadError(path, format: "parallels", words)
        }
    }
}
