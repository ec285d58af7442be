import Foundation
import XCTest

/// `ferry` against `qemu-img` on VDI images: qemu-made images read, info and map print the
/// same bytes, Ferry-made images pass `qemu-img check` and `compare`, broken images give one
/// clear line.
final class VDICLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("vdi") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 8M 1M", "write -P 0x22 1500M 2M", "write -P 0x33 2047M 1M"]

    /// qemu-img-made images: dynamic (sparse, with a zeroed block) and static.
    func buildImages() throws -> [String] {
        try Tools.must("qemu-img", ["create", "-q", "-f", "vdi", "dynamic.vdi", "2G"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "vdi", "-o", "static=on", "static.vdi", "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "vdi"] + Self.writes.flatMap { ["-c", $0] } + ["dynamic.vdi"], in: dir)
        try Tools.must("qemu-io", ["-f", "vdi", "-c", "write -P 0x44 0 1M", "-c", "write -P 0x55 33M 5k", "static.vdi"], in: dir)
        return ["dynamic.vdi", "static.vdi"]
    }

    func testInfoAndMapMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        for image in try buildImages() {
            for c in [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]] {
                let theirs = try Tools.run(qemu, c + [image], in: dir)
                let ours = try Tools.ferry(c + [image], in: dir)
                XCTAssertEqual(theirs.status, 0, theirs.stderr)
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \(c.joined(separator: " ")) \(image) differs from qemu-img")
                XCTAssertEqual(ours.status, 0, ours.stderr)
            }
        }
    }

    func testConvertQemuImagesToRawAndQcow2() throws {
        let qemu = try Tools.require("qemu-img")
        for image in try buildImages() {
            for format in ["raw", "qcow2"] {
                let out = "\(image).\(format)"
                let r = try Tools.ferry(["convert", "-O", format, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -O \(format): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-f", "vdi", "-F", format, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(format): \(cmp.stdout)\(cmp.stderr)")
                if format == "raw" { XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent(out).path), 32 << 20, "\(out) is not sparse") }
                try? FileManager.default.removeItem(at: dir.appendingPathComponent(out))
            }
        }
    }

    /// A 500 GiB dynamic image with 2 MiB of data: its free blocks are never read.
    func testSparseDynamicImageConvertsInTimeProportionalToItsData() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "vdi", "big.vdi", "500G"], in: dir)
        try Tools.must("qemu-io", ["-f", "vdi", "-c", "write -P 1 0 1M", "-c", "write -P 2 400G 1M", "big.vdi"], in: dir)
        let start = Date()
        let r = try Tools.ferry(["convert", "-O", "qcow2", "big.vdi", "big.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(start), 20)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "big.vdi", "big.qcow2"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    func testFerryWrittenImagesPassCheckAndCompare() throws {
        let qemu = try Tools.require("qemu-img")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "src.qcow2", "100000k"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xab 0 4k", "-c", "write -P 0x11 1M 3M", "-c", "write -z 5M 2M",
                                   "-c", "write -P 0x22 50M 3584", "-c", "write -P 0x33 97M 512k", "src.qcow2"], in: dir)
        for (out, options) in [("d.vdi", "static=off"), ("s.vdi", "static=on"), ("x.vdi", "")] {
            let r = try Tools.ferry(["convert", "-O", "vdi"] + (options.isEmpty ? [] : ["-o", options]) + ["src.qcow2", out], in: dir)
            XCTAssertEqual(r.status, 0, "\(options): \(r.stderr)")
            let check = try Tools.run(qemu, ["check", "-f", "vdi", out], in: dir)
            XCTAssertEqual(check.status, 0, "\(out): \(check.stdout)\(check.stderr)")
            let cmp = try Tools.run(qemu, ["compare", "-F", "vdi", "src.qcow2", out], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(out): \(cmp.stdout)\(cmp.stderr)")
            let info = try Tools.run(qemu, ["info", "--output=json", out], in: dir)
            XCTAssertTrue(info.stdout.contains("\"format\": \"vdi\""), info.stdout)
            XCTAssertTrue(info.stdout.contains("\"virtual-size\": 102400000,"), info.stdout)
            for c in [["info", "--output=json"], ["map", "--output=json"]] {
                let theirs = try Tools.run(qemu, c + [out], in: dir)
                let ours = try Tools.ferry(c + [out], in: dir)
                XCTAssertEqual(ours.stdout, theirs.stdout, "\(out): \(c)")
            }
            let file = fileSize(dir.appendingPathComponent(out).path)
            if options == "static=on" {
                XCTAssertGreaterThanOrEqual(file, 102400000)
            } else {
                // Only the blocks with data: 0-4M, 50M, 97M (5 or 6 blocks), not 98.
                XCTAssertLessThan(file, 10 << 20, "\(out) holds more blocks than data")
            }
        }
        // And back: Ferry reads what it wrote.
        let back = try Tools.ferry(["convert", "-O", "raw", "d.vdi", "back.raw"], in: dir)
        XCTAssertEqual(back.status, 0, back.stderr)
        XCTAssertEqual(try Tools.run(qemu, ["compare", "-F", "raw", "src.qcow2", "back.raw"], in: dir).status, 0)
        let bad = try Tools.ferry(["convert", "-O", "vdi", "-o", "static=maybe", "src.qcow2", "y.vdi"], in: dir)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("static"), bad.stderr)
    }

    // MARK: - Broken images

    func patched(_ name: String, at offset: Int, bytes: [UInt8]) throws -> String {
        let src = dir.appendingPathComponent("good.vdi")
        if !FileManager.default.fileExists(atPath: src.path) {
            try Tools.must("qemu-img", ["create", "-q", "-f", "vdi", "good.vdi", "8M"], in: dir)
            try Tools.must("qemu-io", ["-f", "vdi", "-c", "write -P 7 0 2M", "good.vdi"], in: dir)
        }
        var data = try Data(contentsOf: src)
        data.replaceSubrange(offset ..< offset + bytes.count, with: bytes)
        try data.write(to: dir.appendingPathComponent(name))
        return name
    }

    func le32(_ v: UInt32) -> [UInt8] { (0 ..< 4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }

    func testBrokenImagesGiveOneClearLine() throws {
        let cases: [(String, Int, [UInt8], String)] = [
            ("sig.vdi", 0x40, le32(0xbeda_1080), "raw"), // no longer a vdi: read as raw by both
            ("version.vdi", 0x44, le32(0x0002_0000), "version 2.0"),
            ("bmap.vdi", 0x154, le32(0x7fff_0000), "block map"),
            ("entry.vdi", 0x200, le32(100), "out of range"),
            ("bs0.vdi", 0x178, le32(0), "block size 0"),
            ("bshuge.vdi", 0x178, le32(1 << 30), "block size"),
            ("disksize.vdi", 0x170, le32(0x7fff_0000), "disk size"),
            ("type.vdi", 0x4c, le32(4), "image type 4"),
        ]
        for (name, at, bytes, want) in cases {
            let image = try patched(name, at: at, bytes: bytes)
            let r = try Tools.ferry(["info", "--output=json", image], in: dir)
            if want == "raw" {
                XCTAssertTrue(r.stdout.contains("\"format\": \"raw\""), "\(name): \(r.stdout)\(r.stderr)")
                continue
            }
            XCTAssertEqual(r.status, 1, "\(name): \(r.stdout)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(name): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(want), "\(name): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(name), "\(name): \(r.stderr)")
        }
        // Truncated: the allocated blocks lie past the end of the file.
        let data = try Data(contentsOf: dir.appendingPathComponent("good.vdi"))
        try data.prefix(1 << 20).write(to: dir.appendingPathComponent("trunc.vdi"))
        let r = try Tools.ferry(["convert", "-O", "raw", "trunc.vdi", "t.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("past the end of the file"), r.stderr)
        try data.prefix(100).write(to: dir.appendingPathComponent("tiny.vdi"))
        let t = try Tools.ferry(["info", "-f", "vdi", "tiny.vdi"], in: dir)
        XCTAssertEqual(t.status, 1)
        XCTAssertTrue(t.stderr.contains("truncated"), t.stderr)
    }
}
