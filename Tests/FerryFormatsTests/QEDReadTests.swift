import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// QED images qemu made, read by Ferry and compared with what qemu-img reads.
final class QEDReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("qed-read") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func make(_ name: String, size: String, options: [String] = [], writes: [String]) throws -> String {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qed"] + options + [name, size], in: dir)
        try Oracle.io(name, writes, format: "qed", in: dir)
        return dir.appendingPathComponent(name).path
    }

    func reference(_ path: String) throws -> Data {
        let out = dir.appendingPathComponent("reference.raw").path
        try Oracle.must("qemu-img", ["convert", "-O", "raw", path, out], in: dir)
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try Data(contentsOf: URL(fileURLWithPath: out))
    }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 5M 64k", "write -P 0x22 5308416 3584", "write -P 0x44 20M 1M"]

    func testBytesMatchQemuImgForSeveralLayouts() async throws {
        for (name, options) in [("d.qed", ""), ("s.qed", "cluster_size=4k,table_size=2"), ("b.qed", "cluster_size=256k,table_size=16")] {
            let path = try make(name, size: "37M", options: options.isEmpty ? [] : ["-o", options], writes: Self.writes)
            let expected = try reference(path)
            let got = try await withOpened(path) { image -> Data in
                XCTAssertEqual(image.format, "qed")
                return try await readAll(image.device, chunk: 300_000)
            }
            XCTAssertEqual(got.count, expected.count, name)
            XCTAssertTrue(got == expected, "\(name): bytes differ from qemu-img's")
        }
    }

    /// Extents come from the tables: data runs, the zero cluster, and the rest unallocated.
    func testExtentsFollowTheTables() async throws {
        let path = try make("e.qed", size: "1G", writes: ["write -P 1 4M 64k", "write -z 8M 128k", "write -P 2 700M 1M"])
        try await withOpened(path) { image in
            var out: [Extent] = []
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { if $0.kind != .unallocated { out.append($0) } }
            let mib: Int64 = 1 << 20
            let want: [Range<Int64>] = [4 * mib ..< 4 * mib + 65536, 8 * mib ..< 8 * mib + 131072, 700 * mib ..< 701 * mib]
            XCTAssertEqual(out.map(\.range), want)
            XCTAssertEqual(out.map(\.kind), [.data, .zero, .data])
        }
    }

    /// An overlay over a raw base (the no-probe feature): unallocated clusters read the base.
    func testOverlayFallsThroughToItsRawBase() async throws {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "8M"], in: dir)
        try Oracle.io("base.raw", ["write -P 0x77 0 8M"], format: "raw", in: dir)
        let path = try make("o.qed", size: "8M", options: ["-b", "base.raw", "-F", "raw"], writes: ["write -P 0x55 1M 64k", "write -z 2M 64k"])
        let expected = try reference(path)
        let got = try await withOpened(path) { image -> Data in
            XCTAssertEqual((image.device as? any DescribedDevice)?.details.backingFormat, "raw")
            return try await readAll(image.device)
        }
        XCTAssertTrue(got == expected, "overlay bytes differ from qemu-img's")
        XCTAssertEqual(got[(1 << 20) + 5], 0x55)
        XCTAssertEqual(got[(2 << 20) + 5], 0)
        XCTAssertEqual(got[(3 << 20) + 5], 0x77)
    }

    func testUnknownFeatureIsRefused() async throws {
        let path = try make("f.qed", size: "4M", writes: [])
        try Patcher(path: path).write([0x10], at: 16)
        do {
            _ = try await withOpened(path) { _ in 0 }
            XCTFail("opened an image with an unknown feature")
        } catch let e as FerryError {
            XCTAssertTrue("\(e)".contains("unknown incompatible features 0x10"), "\(e)")
        }
    }
}
