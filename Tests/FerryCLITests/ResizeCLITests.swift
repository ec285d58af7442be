import Foundation
import XCTest

/// `ferry resize` against `qemu-img resize` on copies of the same images: the same output
/// and exit status, images that `qemu-img compare` finds identical, and qcow2 images that
/// `qemu-img check` finds clean.
final class ResizeCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("resize") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func virtualSize(_ image: String) throws -> String {
        let info = try Tools.must("qemu-img", ["info", "--output=json", image], in: dir)
        return info.split(separator: "\n").first { $0.contains("\"virtual-size\"") }.map(String.init) ?? ""
    }

    /// Resizes a copy of `image` with qemu-img and another with ferry, and compares.
    func same(_ image: String, _ args: [String], size: String, checked: Bool, file: StaticString = #filePath, line: UInt = #line) throws {
        let (theirs, ours) = try SubcommandGolden.copies(of: image, in: dir)
        let q = try Tools.run(try Tools.require("qemu-img"), ["resize"] + args + [theirs, "--", size], in: dir)
        let f = try Tools.ferry(["resize"] + args + [ours, "--", size], in: dir)
        let what = "resize \(args.joined(separator: " ")) \(image) \(size)"
        XCTAssertEqual(f.stdout, q.stdout, what, file: file, line: line)
        XCTAssertEqual(f.status, q.status, "\(what): \(f.stderr)", file: file, line: line)
        if q.status != 0 {
            XCTAssertEqual(f.stderr, q.stderr.replacingOccurrences(of: "qemu-img:", with: "ferry:"), what, file: file, line: line)
        }
        XCTAssertEqual(try virtualSize(ours), try virtualSize(theirs), what, file: file, line: line)
        XCTAssertEqual(fileSize(dir.appendingPathComponent(ours).path) >= 0, true)
        let fmt = args.contains("raw") ? ["-f", "raw", "-F", "raw"] : []
        let c = try Tools.run(try Tools.require("qemu-img"), ["compare"] + fmt + [theirs, ours], in: dir)
        XCTAssertEqual(c.status, 0, "\(what): \(c.stdout)", file: file, line: line)
        if checked {
            let k = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
            XCTAssertEqual(k.status, 0, "\(what): \(k.stdout)", file: file, line: line)
        }
    }

    func testRawMatchesQemuImg() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "r.raw", "10M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 7 0 1M", "-c", "write -P 8 9M 1M", "r.raw"], in: dir)
        for (args, size) in [([String](), "20M"), ([], "+1000"), (["--shrink"], "5M"), (["--shrink"], "-1M"), ([], "5M"), ([], "-20M"),
                             (["--preallocation=falloc"], "+10M"), (["--preallocation=full"], "+10M"), (["--preallocation=metadata"], "+10M"),
                             (["-q"], "30M")] {
            try same("r.raw", ["-f", "raw"] + args, size: size, checked: false)
        }
        // Preallocated means allocated: the 2M written and the 10M added.
        XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent("r.raw").path), 3 << 20)
        let full = try Tools.ferry(["resize", "-f", "raw", "--preallocation=full", "r.raw", "20M"], in: dir)
        XCTAssertEqual(full.status, 0, full.stderr)
        XCTAssertGreaterThanOrEqual(allocatedBytes(dir.appendingPathComponent("r.raw").path), 12 << 20)
    }

    func testQCOW2GrowthMatchesQemuImg() throws {
        // Images whose growth keeps the L1 table, needs a new one, and needs new refcount
        // blocks too (small clusters), with snapshots and odd refcount widths.
        for (name, options) in [("a.qcow2", "cluster_size=64k"), ("b.qcow2", "cluster_size=512"),
                                ("c.qcow2", "cluster_size=1k,refcount_bits=2"), ("d.qcow2", "cluster_size=4k,refcount_bits=8"),
                                ("e.qcow2", "cluster_size=2M,extended_l2=on"), ("f.qcow2", "compat=0.10,refcount_bits=16")] {
            try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, name, "1M"], in: dir)
            try Tools.must("qemu-io", ["-c", "write -P 7 0 1M", name], in: dir)
            if !options.contains("compat=0.10") && !options.contains("=512") {
                try Tools.must("qemu-img", ["snapshot", "-c", "s1", name], in: dir)
                try Tools.must("qemu-io", ["-c", "write -P 9 0 64k", name], in: dir)
            }
            for size in ["200M", "+1000", "1G", "10G", "+3T", "-1M"] {
                try same(name, [], size: size, checked: true)
            }
        }
    }

    /// qcow2 shrinking with --shrink, plain and compressed clusters, L2 tables dropped whole
    /// and in part: the same contents and map as qemu-img's, clean images.
    func testQCOW2ShrinkMatchesQemuImg() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "s.qcow2", "2G"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 1M", "-c", "write -P 2 100M 1M", "-c", "write -P 3 600M 64k",
                                   "-c", "write -z 1500M 64k", "-c", "write -P 4 1999M 1M", "s.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-c", "-O", "qcow2", "s.qcow2", "c.qcow2"], in: dir)
        for image in ["s.qcow2", "c.qcow2"] {
            for size in ["1G", "700M", "600M", "100M", "50M", "512"] {
                try same(image, ["--shrink"], size: size, checked: true)
                XCTAssertEqual(try Tools.must("qemu-img", ["map", "--output=json", "ours-" + image], in: dir),
                               try Tools.must("qemu-img", ["map", "--output=json", "theirs-" + image], in: dir), "\(image) \(size)")
            }
        }
    }

    func testRefusals() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "q.qcow2", "100M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "v.vmdk", "100M"], in: dir)
        // As qemu-img words them.
        try same("q.qcow2", [], size: "50M", checked: true)
        try same("q.qcow2", [], size: "3P", checked: true)
        try same("q.qcow2", [], size: "+100", checked: true)
        // What ferry cannot do yet: one line, nothing changed.
        try Tools.must("qemu-img", ["snapshot", "-c", "s", "q.qcow2"], in: dir)
        for (args, expected) in [(["--shrink", "q.qcow2", "50M"], "cannot shrink qcow2 images with internal snapshots"),
                                 (["--preallocation=full", "q.qcow2", "1G"], "only with --preallocation=off"),
                                 (["v.vmdk", "1G"], "format 'vmdk' does not support resizing"),
                                 (["q.qcow2"], "Expecting image file name and size"),
                                 (["--foo", "q.qcow2", "1G"], "Unknown option '--foo'")] {
            let r = try Tools.ferry(["resize"] + args, in: dir)
            XCTAssertEqual(r.status, 1, args.joined(separator: " "))
            XCTAssertTrue(r.stderr.contains(expected), r.stderr)
        }
        XCTAssertTrue(try virtualSize("q.qcow2").contains("104857600"))
        // A negative size needs no '--', as with qemu-img.
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "n.raw", "3M"], in: dir)
        let r = try Tools.ferry(["resize", "--shrink", "-f", "raw", "n.raw", "-1M"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(fileSize(dir.appendingPathComponent("n.raw").path), 2 << 20)
    }

    func testHelp() throws { try SubcommandGolden.checkHelp("resize", in: dir) }
}
