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
        let device = try await withOpened(path) { image -> [ParallelsDevice.Run] in
            let d = try XCTUnwrap(image.device as? ParallelsDevice)
            return d.runs(in: 0 ..< d.size)
        }
        // Four clusters written in order are one run in the file.
        XCTAssertEqual(device.first?.length, 256 << 10)
        XCTAssertNotNil(device.first?.host)
    }

    // MARK: - Malformed

    /// Opens `path` as parallels and expects one clear line naming the file.
    func expectError(_ path: String, _ words: String, format: String? = "parallels",
                     file: StaticString = #filePath, line: UInt = #line) async {
        do {
            _ = try await withOpened(path, format: format) { try await readAll($0.device) }
            XCTFail("opening \(path) succeeded; expected an error with '\(words)'", file: file, line: line)
        } catch let e as FerryError {
            XCTAssertTrue(e.description.contains(words), "\(e.description)", file: file, line: line)
            XCTAssertTrue(e.description.contains(path), "\(e.description)", file: file, line: line)
            XCTAssertFalse(e.description.contains("\n"), "\(e.description)", file: file, line: line)
        } catch {
            XCTFail("unexpected \(error)", file: file, line: line)
        }
    }

    func testMalformedImages() async throws {
        func fresh(_ name: String) throws -> (String, VHDXPatcher) {
            let p = try make(name, clusterSize: "64k")
            return (p, VHDXPatcher(path: p))
        }
        var (path, p) = try fresh("magic.img")
        try p.write(Array("WithoutFreeSpacX".utf8), at: 0)
        await expectError(path, "bad magic")

        (path, p) = try fresh("version.img")
        try p.u32(3, at: 16)
        await expectError(path, "version 3")

        (path, p) = try fresh("cluster0.img")
        try p.u32(0, at: 28)
        await expectError(path, "cluster size of 0 sectors")

        (path, p) = try fresh("clusterhuge.img")
        try p.u32(0xFFFF_FFFF, at: 28)
        await expectError(path, "cluster size of 4294967295 sectors is out of range")

        (path, p) = try fresh("sectors.img")
        try p.u64(UInt64(161 * 128), at: 36)   // one cluster more than the BAT's 160 entries
        await expectError(path, "needs 161 clusters")

        (path, p) = try fresh("batcount.img")
        try p.u32(0x4000_0000, at: 32)
        await expectError(path, "past the end of the file")

        (path, p) = try fresh("batpast.img")
        try p.u32(0x00FF_FFFF, at: 64)
        await expectError(path, "BAT entry 0 points to file offset")

        (path, p) = try fresh("batlow.img")
        try p.u32(0, at: 48 + 0)   // data_off 0 is not allowed in a "WithouFreSpacExt" image
        await expectError(path, "data_off is 0")

        (path, p) = try fresh("overlap.img")
        try p.u32(1, at: 48)   // data area at 512, inside the BAT
        await expectError(path, "overlaps the BAT")

        (path, p) = try fresh("inuse.img")
        try p.u32(0x1234_5678, at: 44)
        await expectError(path, "in_use field holds the invalid value 0x12345678")

        (path, p) = try fresh("before.img")
        try p.u32(1, at: 72)   // cluster 2 at file offset 64 KiB... then move data_off past it
        try p.u32(256, at: 48)
        await expectError(path, "before the data area")

        (path, p) = try fresh("truncated.img")
        try Patcher(path: path).truncate(to: 40)
        await expectError(path, "header is truncated")

        (path, p) = try fresh("cut.img")
        try Patcher(path: path).truncate(to: 70 << 10)   // the clusters at 1 MiB and after are gone
        await expectError(path, "past the end of the file")
    }
}
