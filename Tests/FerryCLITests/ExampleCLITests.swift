import Foundation
import XCTest

/// The library's example program (Examples/ConvertWithProgress, shown in the DocC article
/// "Embedding Ferry") builds with the package and converts an image with progress.
final class ExampleCLITests: XCTestCase {
    func testExampleConvertsWithProgress() throws {
        let dir = try makeScratchDirectory("example")
        defer { try? FileManager.default.removeItem(at: dir) }
        let example = URL(fileURLWithPath: try Tools.require("ferry")).deletingLastPathComponent().appendingPathComponent("ferry-example").path
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: example), "swift build builds ferry-example next to ferry")
        let src = try TestImage(name: "src.raw", size: 16 << 20, writes: ["write -P 0x5a 0 4M", "write -P 0xa5 12M 4M"]).build(in: dir)
        let dst = dir.appendingPathComponent("dst.qcow2").path
        let r = try Tools.run(example, [src, dst], in: dir)
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.last, "done: 8388608 bytes written, 8388608 skipped as holes", r.stdout)
        XCTAssertTrue(lines.dropLast().allSatisfy { $0.hasSuffix("%") }, r.stdout)
        XCTAssertEqual(lines.dropLast().last, "100%", r.stdout)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", src, dst], in: dir)
        let bad = try Tools.run(example, [dir.appendingPathComponent("missing.raw").path, dst + "2"], in: dir)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stdout.hasPrefix("failed: "), bad.stdout)
    }
}
