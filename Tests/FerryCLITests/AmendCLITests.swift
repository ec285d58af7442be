import Foundation
import XCTest

/// `ferry amend` against `qemu-img amend` on copies of the same images: the same header,
/// byte for byte, where ferry can amend, and a refusal that changes nothing where it cannot.
final class AmendCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("amend") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func data(_ name: String) throws -> Data { try Data(contentsOf: dir.appendingPathComponent(name)) }

    func buildImages() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "b.qcow2", "10M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "ov.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 3 0 64k", "ov.qcow2"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "lazy.qcow2", "10M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "r.raw", "1M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "df.qcow2", "10M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "zero.qcow2", "10M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -z 0 64k", "zero.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 1M", "v2.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "s", "v2.qcow2"], in: dir)
    }

    /// compat changes: the same `info` as qemu-img's result (the header bytes differ only in
    /// the feature name table qemu-img adds on upgrade; downgrades are byte for byte), clean,
    /// the same contents.
    func testCompatMatchesQemuImg() throws {
        try buildImages()
        for (image, options) in [("v2.qcow2", "compat=1.1"), ("v2.qcow2", "compat=1.1,lazy_refcounts=on"),
                                 ("b.qcow2", "compat=0.10"), ("ov.qcow2", "compat=0.10")] {
            let (theirs, ours) = try SubcommandGolden.copies(of: image, in: dir)
            try Tools.must("qemu-img", ["amend", "-o", options, theirs], in: dir)
            let r = try Tools.ferry(["amend", "-o", options, ours], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let i1 = try Tools.must("qemu-img", ["info", theirs], in: dir).replacingOccurrences(of: theirs, with: "IMG")
            let i2 = try Tools.must("qemu-img", ["info", ours], in: dir).replacingOccurrences(of: ours, with: "IMG")
            XCTAssertEqual(i2.split(separator: "\n").filter { !$0.hasPrefix("disk size") && !$0.contains(" 20") },
                           i1.split(separator: "\n").filter { !$0.hasPrefix("disk size") && !$0.contains(" 20") }, "\(image) \(options)")
            XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir).status, 0)
            try Tools.must("qemu-img", ["compare", theirs, ours], in: dir)
            if options == "compat=0.10" { XCTAssertEqual(try data(ours), try data(theirs), "\(image) \(options)") }
        }
    }

    func testMatchesQemuImg() throws {
        try buildImages()
        for (image, options) in [("ov.qcow2", "lazy_refcounts=on"), ("lazy.qcow2", "lazy_refcounts=off"), ("ov.qcow2", "lazy_refcounts=off"),
                                 ("ov.qcow2", "lazy_refcounts=on,compat=1.1,refcount_bits=16"), ("ov.qcow2", "backing_file=b.qcow2,backing_fmt=qcow2"),
                                 ("v2.qcow2", "compat=0.10"), ("df.qcow2", "data_file=other.raw"), ("df.qcow2", "data_file="),
                                 ("df.qcow2", "data_file=data.raw")] {
            let (theirs, ours) = try SubcommandGolden.copies(of: image, in: dir)
            try Tools.must("qemu-img", ["amend", "-o", options, theirs], in: dir)
            let r = try Tools.ferry(["amend", "-o", options, ours], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertEqual(r.stdout, "")
            XCTAssertEqual(try data(ours), try data(theirs), "amend -o \(options) \(image)")
            // (An image whose data file is renamed away or dropped cannot be opened to check.)
            if options != "data_file=other.raw" && options != "data_file=" {
                let k = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
                XCTAssertEqual(k.status, 0, k.stdout)
            }
        }
    }

    func testRefusals() throws {
        try buildImages()
        try buildShared()
        let cases: [([String], String)] = [
            (["-o", "backing_file=other.qcow2", "ov.qcow2"], "Cannot amend the backing file"),
            (["-o", "backing_fmt=qcow2", "ov.qcow2"], "Cannot amend the backing file"),
            (["-o", "cluster_size=4k", "ov.qcow2"], "Invalid parameter 'cluster_size'. This option is only supported for image creation"),
            (["-o", "foo=1", "ov.qcow2"], "Invalid parameter 'foo'"),
            (["-o", "lazy_refcounts=maybe", "ov.qcow2"], "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
            (["-o", "lazy_refcounts=on", "v2.qcow2"], "Lazy refcounts only supported with compatibility level 1.1"),
            (["-o", "data_file=x", "ov.qcow2"], "data-file can only be set for images that use an external data file"),
            (["-o", "compat=0.10", "zero.qcow2"], "cannot downgrade this image to compat=0.10 yet: it has zero clusters"),
            (["-o", "refcount_bits=3", "ov.qcow2"], "Refcount width must be a power of two and may not exceed 64 bits"),
            (["-o", "refcount_bits=128", "ov.qcow2"], "Refcount width must be a power of two and may not exceed 64 bits"),
            (["-o", "refcount_bits=8", "v2.qcow2"], "Refcount widths other than 16 bits require compatibility level 1.1 or above"),
            (["-o", "refcount_bits=1", "shared.qcow2"], "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x"),
            (["-o", "size=20M", "ov.qcow2"], "use 'ferry resize'"),
            (["-f", "raw", "-o", "preallocation=off", "r.raw"], "Format driver 'raw' does not support option amendment"),
            (["ov.qcow2"], "Must specify options (-o)"),
        ]
        for (args, expected) in cases {
            let before = try data(args.last!)
            let r = try Tools.ferry(["amend"] + args, in: dir)
            XCTAssertEqual(r.status, 1, args.joined(separator: " "))
            XCTAssertTrue(r.stderr.contains(expected), "\(args): \(r.stderr)")
            XCTAssertEqual(try data(args.last!), before, "\(args) changed the image")
            // qemu-img refuses these too, except the changes it can make and ferry cannot yet.
            if !expected.contains("cannot change") && !expected.contains("cannot downgrade") && !expected.contains("ferry resize") {
                let q = try Tools.run(try Tools.require("qemu-img"), ["amend"] + args, in: dir)
                XCTAssertEqual(q.status, 1, "qemu-img amend \(args)")
            }
        }
    }

    /// refcount_bits: every width, from and to each other, and with compat=1.1 from an old
    /// image: clean, the same contents and snapshots, the width qemu-img sees.
    func testRefcountBitsChanged() throws {
        try buildImages()
        try buildShared()
        for (image, options) in [("shared.qcow2", "refcount_bits=2"), ("shared.qcow2", "refcount_bits=64"), ("ov.qcow2", "refcount_bits=1"),
                                 ("ov.qcow2", "refcount_bits=8"), ("v2.qcow2", "refcount_bits=4,compat=1.1"), ("shared.qcow2", "refcount_bits=32")] {
            let (theirs, ours) = try SubcommandGolden.copies(of: image, in: dir)
            try Tools.must("qemu-img", ["amend", "-o", options, theirs], in: dir)
            let r = try Tools.ferry(["amend", "-o", options, ours], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let k = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
            XCTAssertEqual(k.status, 0, "\(image) \(options): \(k.stdout)")
            try Tools.must("qemu-img", ["compare", image, ours], in: dir)
            let i1 = try Tools.must("qemu-img", ["info", theirs], in: dir).replacingOccurrences(of: theirs, with: "IMG")
            let i2 = try Tools.must("qemu-img", ["info", ours], in: dir).replacingOccurrences(of: ours, with: "IMG")
            XCTAssertEqual(i2.split(separator: "\n").filter { !$0.hasPrefix("disk size") }, i1.split(separator: "\n").filter { !$0.hasPrefix("disk size") },
                           "\(image) \(options)")
            // And back again to 16 bits, still clean, from the narrow or wide width.
            XCTAssertEqual(try Tools.ferry(["amend", "-o", "refcount_bits=16", ours], in: dir).status, 0)
            XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir).status, 0)
            try Tools.must("qemu-img", ["compare", image, ours], in: dir)
            for sn in try Tools.must("qemu-img", ["snapshot", "-l", image], in: dir).split(separator: "\n").dropFirst(2) {
                let name = String(sn.split(separator: " ")[1])
                try Tools.must("qemu-img", ["compare", "-F", "qcow2", "-f", "qcow2", "-s", image, ours], in: dir)
                XCTAssertTrue(try Tools.must("qemu-img", ["snapshot", "-l", ours], in: dir).contains(name))
            }
        }
    }

    /// An image whose clusters are shared by two snapshots (refcount 3).
    func buildShared() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "shared.qcow2", "10M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 5 0 2M", "-c", "write -P 6 8M 64k", "shared.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "one", "shared.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "two", "shared.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 7 1M 64k", "shared.qcow2"], in: dir)
    }

    func testHelp() throws { try SubcommandGolden.checkHelp("amend", in: dir) }
}
