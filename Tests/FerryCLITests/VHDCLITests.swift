import Foundation
import XCTest

/// `ferry` against `qemu-img` (and libvhdi's `vhdiinfo`) on VHD images: `info` and `map`
/// print the same bytes, `convert` copies what qemu-img copies.
final class VHDCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("vhd") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 8M 1M", "write -P 0x22 2047M 2M", "write -P 0x33 4095M 1M"]

    /// qemu-img-made images: dynamic, fixed, and both with force_size (4 GiB, sparse).
    func buildImages() throws -> [(name: String, format: [String])] {
        var out: [(String, [String])] = []
        for (name, options) in [("dynamic.vhd", "subformat=dynamic"), ("fixed.vhd", "subformat=fixed"),
                                ("dynamic-fs.vhd", "force_size=on"), ("fixed-fs.vhd", "subformat=fixed,force_size=on")] {
            try Tools.must("qemu-img", ["create", "-q", "-f", "vpc", "-o", options, name, "4G"], in: dir)
            try Tools.must("qemu-io", ["-f", "vpc"] + Self.writes.flatMap { ["-c", $0] } + [name], in: dir)
            // Fixed disks do not probe (no footer copy at offset 0): named with -f, as for qemu-img.
            out.append((name, options.contains("fixed") ? ["-f", "vpc"] : []))
        }
        return out
    }

    func testInfoAndMapMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        for (image, f) in try buildImages() {
            for c in [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]] {
                let theirs = try Tools.run(qemu, c + f + [image], in: dir)
                let ours = try Tools.ferry(c + f + [image], in: dir)
                XCTAssertEqual(theirs.status, 0, theirs.stderr)
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \((c + f).joined(separator: " ")) \(image) differs from qemu-img")
                XCTAssertEqual(ours.status, 0, ours.stderr)
            }
        }
    }

    func testConvertEverySubformat() throws {
        let qemu = try Tools.require("qemu-img")
        for (image, f) in try buildImages() {
            for format in ["raw", "qcow2"] {
                let out = "\(image).\(format)"
                let r = try Tools.ferry(["convert"] + f + ["-O", format, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -O \(format): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-f", "vpc", "-F", format, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(format): \(cmp.stdout)\(cmp.stderr)")
                if format == "raw" { XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent(out).path), 32 << 20, "\(out) is not sparse") }
                try? FileManager.default.removeItem(at: dir.appendingPathComponent(out))
            }
        }
    }

    /// A 200 GiB dynamic disk with 2 MiB of data converts in time proportional to its data:
    /// its unallocated blocks are holes, never read.
    func testSparseDynamicDiskConvertsInTimeProportionalToItsData() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "vpc", "big.vhd", "200G"], in: dir)
        try Tools.must("qemu-io", ["-f", "vpc", "-c", "write -P 1 0 1M", "-c", "write -P 2 150G 1M", "big.vhd"], in: dir)
        let start = Date()
        let r = try Tools.ferry(["convert", "-O", "qcow2", "big.vhd", "big.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
        XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent("big.qcow2").path), 16 << 20)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "big.vhd", "big.qcow2"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    /// A bad checksum is one line naming the file and the place.
    func testBadChecksumIsOneClearLine() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "vpc", "bad.vhd", "64M"], in: dir)
        let h = try FileHandle(forUpdating: dir.appendingPathComponent("bad.vhd"))
        try h.seek(toOffset: 512 + 40)
        try h.write(contentsOf: Data([0x55]))
        try h.close()
        let r = try Tools.ferry(["info", "bad.vhd"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: bad.vhd: vhd dynamic disk header checksum mismatch (stored 0xfffff456, computed 0xfffff401) at offset 512\n")
    }
}
