import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// Real VMDK images broken in known places: each gives one clear error naming the file,
/// never a crash, a hang, or an allocation out of proportion to the file.
final class VMDKReadMalformedTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vmdk-bad") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// A 4 MiB monolithicSparse image with 64 KiB grains, data at 0 and 1 MiB.
    func makeImage(_ name: String = "bad.vmdk", options: String = "") throws -> (String, VMDKReadPatcher) {
        let path = try VMDKReadOracle.make(name, size: "4M", options: options,
                                          writes: ["write -P 0x11 0 64k", "write -P 0x12 1M 64k"], in: dir)
        return (path, VMDKReadPatcher(path: path))
    }

    /// Opens and reads the whole image; expects an error of `code` that names `path` (the
    /// image, unless `about` names an extent file) and says `words`.
    func expectError(_ path: String, about: String? = nil, _ code: FerryError.Code, _ words: String,
                     file: StaticString = #filePath, line: UInt = #line) async {
        do {
            try await withOpened(path) { image in
                _ = try await readAll(image.device)
                try await image.device.forEachExtent(in: 0 ..< image.device.size) { _ in }
            }
            XCTFail("\(path) opened and read without an error", file: file, line: line)
        } catch let e as FerryError {
            XCTAssertEqual(e.code, code, e.description, file: file, line: line)
            XCTAssertEqual(e.path, about ?? path, e.description, file: file, line: line)
            XCTAssertTrue(e.description.contains(words), "\(e.description) does not say '\(words)'", file: file, line: line)
            XCTAssertFalse(e.description.contains("\n"), file: file, line: line)
        } catch {
            XCTFail("unexpected error \(error)", file: file, line: line)
        }
    }

    func gdOffset(_ p: VMDKReadPatcher) throws -> Int64 { Int64(try p.readLE(at: 56, bytes: 8)) * 512 }
    func gtOffset(_ p: VMDKReadPatcher) throws -> Int64 { Int64(try p.readLE(at: try gdOffset(p), bytes: 4)) * 512 }

    func testBareSeSparseFileIsRefusedByName() async throws {
        let path = dir.appendingPathComponent("se.vmdk").path
        var bytes: [UInt8] = [0xbe, 0xba, 0xfe, 0xca, 0, 0, 0, 0]
        bytes += [UInt8](repeating: 0, count: 4096 - bytes.count)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        await expectError(path, .notSupported, "seSparse is not supported")
    }

    func testTruncatedFile() async throws {
        let (path, p) = try makeImage()
        try p.truncate(to: 300)
        await expectError(path, .corrupt, "sparse header is truncated")
        // Header and tables whole, the grains cut off.
        let (path2, p2) = try makeImage("cut.vmdk")
        let grain = Int64(try p2.readLE(at: try gtOffset(p2), bytes: 4)) * 512
        try p2.truncate(to: grain)
        await expectError(path2, .corrupt, "past the end of the file")
    }

    func testGrainTablePastTheEnd() async throws {
        let (path, p) = try makeImage()
        try p.u32(0x7FFF_FFF0, at: try gdOffset(p))
        await expectError(path, .corrupt, "grain table at offset \(Int64(0x7FFF_FFF0) * 512) lies past the end of the file")
    }

    func testGrainDirectoryPastTheEnd() async throws {
        let (path, p) = try makeImage()
        try p.u64(0x7FFF_FFFF_FFF0, at: 56)
        await expectError(path, .corrupt, "grain directory at sector")
    }

    func testGarbageInHeaderFields() async throws {
        let (path, p) = try makeImage()
        try p.u64(0, at: 20)
        await expectError(path, .corrupt, "invalid grain size of 0 sectors")
        try p.u64(UInt64.max / 2, at: 20)
        await expectError(path, .corrupt, "invalid grain size")
        try p.u64(128, at: 20)
        try p.u32(0, at: 44)
        await expectError(path, .corrupt, "grain table entries (0)")
        try p.u32(0xFFFF_FFFF, at: 44)
        await expectError(path, .corrupt, "grain table entries (4294967295)")
        try p.u32(512, at: 44)
        // A huge capacity needs a huge directory, which the file does not hold: refused
        // before anything that size is allocated.
        try p.u64(1 << 40, at: 12)
        await expectError(path, .corrupt, "grain directory at sector")
        try p.u64(1 << 50, at: 12)
        await expectError(path, .notSupported, "grain directory of 17179869184 entries is larger than Ferry reads")
        try p.u64(UInt64.max, at: 12)
        await expectError(path, .corrupt, "invalid capacity")
        try p.u64(8192, at: 12)
        try p.u32(99, at: 4)
        await expectError(path, .notSupported, "version 99")
        try p.u32(1, at: 4)
        try p.u32(1 << 16, at: 8)      // compressed, with an unknown algorithm
        try p.write([7, 0], at: 77)
        await expectError(path, .notSupported, "compression algorithm 7")
    }

    func testGrainPastTheEnd() async throws {
        let (path, p) = try makeImage()
        try p.u32(0x7FFF_FFF0, at: try gtOffset(p))
        await expectError(path, .corrupt, "points to \(Int64(0x7FFF_FFF0) * 512), past the end of the file")
    }

    func testBadEmbeddedDescriptor() async throws {
        let (path, p) = try makeImage()
        let text = try p.descriptor().text
        try p.setDescriptor(text.replacingOccurrences(of: "parentCID=ffffffff", with: "parentCID=zz"))
        await expectError(path, .corrupt, "invalid parentCID 'zz'")
        // A descriptor that claims to be huge is read only up to a bound.
        try p.setDescriptor(text)
        try p.u64(1 << 40, at: 36)
        try await withOpened(path) { image in XCTAssertEqual(image.device.size, 4 << 20) }
    }

    /// twoGbMaxExtentSparse with 1 MiB written in each of its three extents.
    func makeSplit() throws -> String {
        try VMDKReadOracle.make("split.vmdk", size: "5G", options: "subformat=twoGbMaxExtentSparse",
                                writes: ["write -P 1 0 1M", "write -P 2 3G 1M", "write -P 3 4600M 1M"], in: dir)
    }

    func rewrite(_ path: String, _ from: String, _ to: String) throws {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertTrue(text.contains(from))
        try text.replacingOccurrences(of: from, with: to).write(toFile: path, atomically: true, encoding: .utf8)
    }

    func testMissingExtentFile() async throws {
        let path = try makeSplit()
        try FileManager.default.removeItem(atPath: dir.appendingPathComponent("split-s002.vmdk").path)
        await expectError(path, .notFound, "vmdk extent file 'split-s002.vmdk' could not be opened")
    }

    func testExtentPathsThatLeaveTheFolder() async throws {
        let path = try makeSplit()
        try rewrite(path, "\"split-s002.vmdk\"", "\"../split-s002.vmdk\"")
        await expectError(path, .corrupt, "extent path '../split-s002.vmdk' escapes the descriptor's folder")
        try rewrite(path, "\"../split-s002.vmdk\"", "\"sub/../../split-s002.vmdk\"")
        await expectError(path, .corrupt, "escapes the descriptor's folder")
        try rewrite(path, "\"sub/../../split-s002.vmdk\"", "\"/etc/passwd\"")
        await expectError(path, .corrupt, "extent path '/etc/passwd' escapes the descriptor's folder")
    }

    func testBadExtentLines() async throws {
        let path = try makeSplit()
        try rewrite(path, "SPARSE \"split-s002.vmdk\"", "FOO \"split-s002.vmdk\"")
        await expectError(path, .notSupported, "extent type 'FOO' is not supported")
        try rewrite(path, "RW 4194304 FOO \"split-s002.vmdk\"", "RW lots SPARSE \"split-s002.vmdk\"")
        await expectError(path, .corrupt, "is not a number of sectors")
        try rewrite(path, "RW lots SPARSE \"split-s002.vmdk\"", "RW 4194304 SPARSE \"split-s002.vmdk")
        await expectError(path, .corrupt, "no closing quote")
        try rewrite(path, "RW 4194304 SPARSE \"split-s002.vmdk", "RW 4194304 SPARSE \"split-s002.vmdk\"")
        try rewrite(path, "createType=\"twoGbMaxExtentSparse\"", "createType=\"seSparse\"")
        await expectError(path, .notSupported, "vmdk subformat seSparse is not supported")
    }

    func testOversizedDescriptorFile() async throws {
        let path = dir.appendingPathComponent("big.vmdk").path
        let text = "# Disk DescriptorFile\n" + String(repeating: "# padding padding padding\n", count: 5000)
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        await expectError(path, .corrupt, "more than a descriptor can be")
    }

    /// A streamOptimized image; returns where the marker of the grain at guest 0 is.
    func makeStream() throws -> (String, VMDKReadPatcher, Int64) {
        let (src, _) = try makeImage("src.vmdk")
        let path = dir.appendingPathComponent("stream.vmdk").path
        try Oracle.must("qemu-img", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, path], in: dir)
        let p = VMDKReadPatcher(path: path)
        let marker = Int64(try p.readLE(at: try gtOffset(p), bytes: 4)) * 512
        XCTAssertEqual(try p.readLE(at: marker, bytes: 8), 0, "the first grain's marker is not for sector 0")
        return (path, p, marker)
    }

    func testCompressedGrainSizeLies() async throws {
        let (path, p, marker) = try makeStream()
        let size = UInt32(try p.readLE(at: marker + 8, bytes: 4))
        try p.u32(0xFFFF_FFF0, at: marker + 8)
        await expectError(path, .corrupt, "claims 4294967280 compressed bytes")
        let fileSize = (try FileManager.default.attributesOfItem(atPath: path)[.size] as! NSNumber).int64Value
        try p.u32(UInt32(fileSize - marker - 12 + 1), at: marker + 8)
        await expectError(path, .corrupt, "past the end of the file")
        try p.u32(5, at: marker + 8)
        await expectError(path, .corrupt, "does not inflate to a grain")
        try p.u32(size, at: marker + 8)
        try p.u64(77, at: marker)
        await expectError(path, .corrupt, "has a marker for sector 77, not 0")
        try p.u64(0, at: marker)
        try p.write([0xFF, 0xFF, 0xFF, 0xFF], at: marker + 12)
        await expectError(path, .corrupt, "does not inflate")
    }
}
