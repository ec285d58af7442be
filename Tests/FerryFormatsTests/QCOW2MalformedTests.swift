import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// Real images broken in known places: each gives one clear error naming the file, never a
/// crash, a hang, or an allocation out of proportion to the file.
final class QCOW2MalformedTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("qcow2-bad") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// A 4 MiB image with 64 KiB clusters, data at 0 and 1 MiB, a compressed cluster at 2 MiB.
    func makeImage(_ name: String = "bad.qcow2", options: String = "") throws -> (String, Patcher) {
        let path = try Oracle.qcow2(name, size: "4M", options: options,
                                    writes: ["write -P 0x11 0 64k", "write -P 0x12 1M 64k", "write -c -P 0x13 2M 64k"], in: dir)
        return (path, Patcher(path: path))
    }

    /// Opens and reads the whole image; expects an error of `code` that names the image and
    /// says `words`.
    func expectError(_ path: String, _ code: FerryError.Code, _ words: String,
                     file: StaticString = #filePath, line: UInt = #line) async {
        do {
            try await withOpened(path, format: "qcow2") { image in
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

    func l2Offset(_ patch: Patcher) throws -> Int64 {
        let l1 = Int64(try patch.readU64(at: 40))
        return Int64(try patch.readU64(at: l1) & 0x00FF_FFFF_FFFF_FE00)
    }

    func testTruncatedHeader() async throws {
        let (path, patch) = try makeImage()
        try patch.truncate(to: 50)
        await expectError(path, .corrupt, "header is truncated")
    }

    func testBadMagicAndVersion() async throws {
        let (path, patch) = try makeImage()
        try patch.u32(4, at: 4)
        await expectError(path, .corrupt, "version 4")
        try patch.u32(0xFFFF_FFFF, at: 4)
        await expectError(path, .corrupt, "version 4294967295")
        try patch.u32(1, at: 4)
        await expectError(path, .notSupported, "old qcow format")
        try patch.u32(3, at: 4)
        try patch.write([0x51, 0x46, 0x49, 0x00], at: 0)
        await expectError(path, .corrupt, "bad magic")
    }

    func testClusterBitsOutOfRange() async throws {
        let (path, patch) = try makeImage()
        for bits: UInt32 in [8, 22, 63, 0xFFFF_FFFF] {
            try patch.u32(bits, at: 20)
            await expectError(path, .corrupt, "cluster_bits")
        }
    }

    func testL1TableBeyondTheFileOrUnaligned() async throws {
        let (path, patch) = try makeImage()
        try patch.u64(1 << 40, at: 40)
        await expectError(path, .corrupt, "L1 table at")
        try patch.u64(65536 + 8, at: 40)
        await expectError(path, .corrupt, "not aligned")
    }

    func testL1SizeThatDoesNotMatchTheVirtualSize() async throws {
        let (path, patch) = try makeImage()
        // Virtual size 1 PiB with a one-entry L1 table.
        try patch.u64(1 << 50, at: 24)
        await expectError(path, .corrupt, "L1 table has 1 entries")
        // An absurd L1 size is refused before anything is allocated.
        try patch.u64(4 << 20, at: 24)
        try patch.u32(0xFFFF_FFF0, at: 36)
        await expectError(path, .corrupt, "too large")
    }

    func testRefcountTableBeyondTheFileOrUnaligned() async throws {
        let (path, patch) = try makeImage()
        try patch.u64(1 << 40, at: 48)
        await expectError(path, .corrupt, "refcount table")
        try patch.u64(65536 + 512, at: 48)
        await expectError(path, .corrupt, "refcount table offset")
    }

    func testL1EntryAndL2EntryPointingPastTheEnd() async throws {
        let (path, patch) = try makeImage()
        let l1 = Int64(try patch.readU64(at: 40))
        let l2 = try l2Offset(patch)
        // First data cluster's L2 entry: far past the end of the file.
        try patch.u64((1 << 63) | (1 << 45), at: l2)
        await expectError(path, .corrupt, "past the end of the file")
        // Unaligned host offset.
        try patch.u64((1 << 63) | (65536 + 512), at: l2)
        await expectError(path, .corrupt, "not aligned")
        // The L1 entry itself points past the end.
        try patch.u64((1 << 63) | (1 << 44), at: l1)
        await expectError(path, .corrupt, "L2 table at")
    }

    func testCompressedDescriptorsAndData() async throws {
        let (path, patch) = try makeImage()
        let l2 = try l2Offset(patch)
        let entryAt = l2 + 32 * 8   // guest cluster 32 = 2 MiB
        let entry = try patch.readU64(at: entryAt)
        XCTAssertNotEqual(entry & (1 << 62), 0, "the test image has no compressed cluster at 2 MiB")
        // Host offset past the end of the file.
        try patch.u64((1 << 62) | (1 << 40), at: entryAt)
        await expectError(path, .corrupt, "compressed cluster")
        // The right place, but the data there is garbage.
        try patch.u64(entry, at: entryAt)
        let x = UInt64(62 - (16 - 8))
        let host = Int64(entry & ((1 << x) - 1))
        try patch.write([UInt8](repeating: 0xFF, count: 64), at: host)
        await expectError(path, .corrupt, "does not decompress")
        // A zstd image with garbage in a compressed cluster.
        let (zpath, zpatch) = try makeImage("badz.qcow2", options: "compression_type=zstd")
        let zentry = try zpatch.readU64(at: try l2Offset(zpatch) + 32 * 8)
        try zpatch.write([UInt8](repeating: 0x5A, count: 64), at: Int64(zentry & ((1 << x) - 1)))
        await expectError(zpath, .corrupt, "does not decompress with zstd")
    }

    func testUnknownIncompatibleFeatureAndHeaderLength() async throws {
        let (path, patch) = try makeImage()
        try patch.u64(1 << 20, at: 72)
        await expectError(path, .notSupported, "incompatible features")
        try patch.u64(0, at: 72)
        try patch.u32(1 << 20, at: 100)
        await expectError(path, .corrupt, "header_length")
    }

    func testBackingNameOutsideTheHeader() async throws {
        let (path, patch) = try makeImage()
        try patch.u64(1 << 30, at: 8)
        try patch.u32(10, at: 16)
        await expectError(path, .corrupt, "backing file name")
        try patch.u64(512, at: 8)
        try patch.u32(5000, at: 16)
        await expectError(path, .corrupt, "backing file name")
    }

    func testSnapshotTableBeyondTheFile() async throws {
        let (path, patch) = try makeImage()
        try patch.u32(3, at: 60)
        try patch.u64(1 << 40, at: 64)
        await expectError(path, .corrupt, "snapshot table")
    }

    func testRandomCorruptionNeverCrashes() async throws {
        // Flip bytes of the metadata of a real image many times: every outcome is either a
        // successful read or a FerryError, never a trap.
        let (path, _) = try makeImage("seed.qcow2", options: "compression_type=zstd")
        let original = try Data(contentsOf: URL(fileURLWithPath: path))
        var rng = SplitMix(seed: 42)
        for round in 0 ..< 60 {
            var bytes = original
            for _ in 0 ..< 4 {
                // Mostly the header and the L1/L2/refcount clusters (the first 5 clusters).
                let at = Int(rng.next() % UInt64(min(bytes.count, 5 * 65536)))
                bytes[at] = UInt8(truncatingIfNeeded: rng.next())
            }
            let target = dir.appendingPathComponent("fuzz\(round).qcow2")
            try bytes.write(to: target)
            do {
                try await withOpened(target.path, format: "qcow2") { image in
                    guard image.device.size <= 64 << 20 else { return }
                    _ = try await readAll(image.device)
                }
            } catch is FerryError {
            }
            try? FileManager.default.removeItem(at: target)
        }
    }
}
