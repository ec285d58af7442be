import Foundation
import XCTest

/// `ferry snapshot -l` against `qemu-img snapshot -l`, and `convert -l` / `-s` against
/// `qemu-img convert -l`: the same listing, the same bytes copied from each snapshot.
final class SnapshotCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("snapshot") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// An image with two snapshots of different contents (the second after a resize, so
    /// sizes differ) and an active layer unlike both.
    func buildImage() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "sn.qcow2", "10M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 1M", "-c", "write -P 3 9M 1M", "sn.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "first", "sn.qcow2"], in: dir)
        try Tools.must("qemu-img", ["resize", "-q", "sn.qcow2", "20M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 2 0 64k", "-c", "write -z 9M 64k", "-c", "write -P 4 15M 1M", "sn.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "second one", "sn.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 5 0 2M", "sn.qcow2"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "none.qcow2", "1M"], in: dir)
    }

    func testListMatchesQemuImg() throws {
        try buildImage()
        try SubcommandGolden.sameAsQemuImg(["snapshot", "-l", "sn.qcow2"], in: dir)
        try SubcommandGolden.sameAsQemuImg(["snapshot", "-l", "none.qcow2"], in: dir)
        let r = try Tools.ferry(["snapshot", "-l", "sn.qcow2"], in: dir)
        XCTAssertTrue(r.stdout.contains("second one"), r.stdout)
    }

    func testConvertSnapshotMatchesQemuImg() throws {
        try buildImage()
        let cases: [(ours: [String], theirs: [String])] = [
            (["-l", "first"], ["-l", "first"]), (["-l", "2"], ["-l", "2"]), (["-l", "snapshot.id=1"], ["-l", "snapshot.id=1"]),
            (["-l", "snapshot.name=second one"], ["-l", "snapshot.name=second one"]),
            (["-l", "snapshot.id=2,snapshot.name=second one"], ["-l", "snapshot.id=2,snapshot.name=second one"]),
            (["-s", "first"], ["-l", "first"]), (["-s", "2"], ["-l", "2"]),
        ]
        for (n, c) in cases.enumerated() {
            for fmt in ["raw", "qcow2"] {
                let theirs = "theirs\(n).\(fmt)", ours = "ours\(n).\(fmt)"
                try Tools.must("qemu-img", ["convert", "-O", fmt] + c.theirs + ["sn.qcow2", theirs], in: dir)
                let r = try Tools.ferry(["convert", "-q", "-O", fmt] + c.ours + ["sn.qcow2", ours], in: dir)
                XCTAssertEqual(r.status, 0, r.stderr)
                let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-s", theirs, ours], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(c.ours): \(cmp.stdout)")
            }
        }
        // The snapshots differ from each other and from the active layer.
        let a = try Tools.run(try Tools.require("qemu-img"), ["compare", "ours0.raw", "ours1.raw"], in: dir)
        XCTAssertNotEqual(a.status, 0)
        try Tools.must("qemu-io", ["-r", "-f", "raw", "-c", "read -P 1 0 1M", "-c", "read -P 3 9M 1M", "ours0.raw"], in: dir)
        try Tools.must("qemu-io", ["-r", "-f", "raw", "-c", "read -P 2 0 64k", "-c", "read -P 0 9M 64k", "-c", "read -P 4 15M 1M", "ours1.raw"], in: dir)
        // As qemu-img: a snapshot is read at the image's present size.
        XCTAssertEqual(fileSize(dir.appendingPathComponent("ours0.raw").path), 20 << 20)
        XCTAssertEqual(fileSize(dir.appendingPathComponent("ours1.raw").path), 20 << 20)
    }

    func testRefusals() throws {
        try buildImage()
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "r.raw", "1M"], in: dir)
        for (args, expected) in [(["convert", "-l", "nope", "sn.qcow2", "o.raw"], "no snapshot with 'nope'"),
                                 (["convert", "-l", "snapshot.id=1,snapshot.name=second one", "sn.qcow2", "o.raw"], "no snapshot with id '1' and name 'second one'"),
                                 (["convert", "-f", "raw", "-l", "first", "r.raw", "o.raw"], "format raw does not support snapshots"),
                                 (["convert", "-l", "first", "sn.qcow2", "sn.qcow2", "o.raw"], "No support for concatenating multiple snapshot"),
                                 (["convert", "-l", "snapshot.foo=1", "sn.qcow2", "o.raw"], "Invalid parameter 'snapshot.foo'"),
                                 (["snapshot", "-l", "-d", "x", "sn.qcow2"], "Cannot mix"),
                                 (["snapshot", "-d", "nope", "sn.qcow2"], "Could not delete snapshot 'nope': snapshot not found")] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, args.joined(separator: " "))
            XCTAssertTrue(r.stderr.contains(expected), r.stderr)
            XCTAssertFalse(fileExists(dir.appendingPathComponent("o.raw").path))
        }
        // Nothing was changed.
        try SubcommandGolden.sameAsQemuImg(["snapshot", "-l", "sn.qcow2"], in: dir)
    }

    /// `snapshot -c` on images with snapshots already, compressed clusters, compat 0.10,
    /// small clusters and odd refcount widths: qemu-img check finds them clean, the listing
    /// has the new ID and name where qemu-img's has them, the snapshot holds the active layer
    /// of the moment after the active layer changes, and qemu-img can delete it again.
    func testCreateIsWhatQemuImgReads() throws {
        try buildImage()
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "src.raw", "4M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 6 0 3M", "src.raw"], in: dir)
        try Tools.must("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", "src.raw", "compressed.qcow2"], in: dir)
        var images = ["sn.qcow2", "none.qcow2", "compressed.qcow2"]
        for (name, options) in [("v2.qcow2", "compat=0.10"), ("small.qcow2", "cluster_size=512,refcount_bits=4"), ("wide.qcow2", "refcount_bits=64")] {
            try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, name, "4M"], in: dir)
            try Tools.must("qemu-io", ["-c", "write -P 7 0 1M", "-c", "write -P 8 3M 4k", name], in: dir)
            images.append(name)
        }
        for image in images {
            let theirs = "theirs-" + image, ours = "ours-" + image
            for copy in [theirs, ours] {
                try FileManager.default.copyItem(at: dir.appendingPathComponent(image), to: dir.appendingPathComponent(copy))
            }
            try Tools.must("qemu-img", ["convert", "-O", "raw", image, "before-\(image).raw"], in: dir)
            try Tools.must("qemu-img", ["snapshot", "-c", "new snap", theirs], in: dir)
            let r = try Tools.ferry(["snapshot", "-c", "new snap", ours], in: dir)
            XCTAssertEqual(r.status, 0, "\(image): \(r.stderr)")
            let check = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
            XCTAssertEqual(check.status, 0, "\(image): \(check.stdout)")
            func columns(_ text: String) -> [String] { text.split(separator: "\n").map { String($0.prefix(27)) } }
            XCTAssertEqual(columns(try Tools.must("qemu-img", ["snapshot", "-l", ours], in: dir)),
                           columns(try Tools.must("qemu-img", ["snapshot", "-l", theirs], in: dir)), image)
            try Tools.must("qemu-io", ["-c", "write -P 9 0 128k", "-c", "write -z 512k 64k", ours], in: dir)
            try Tools.must("qemu-img", ["convert", "-O", "raw", "-l", "snapshot.name=new snap", ours, "snap-\(image).raw"], in: dir)
            let same = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", "raw", "-F", "raw", "before-\(image).raw", "snap-\(image).raw"], in: dir)
            XCTAssertEqual(same.status, 0, "\(image): \(same.stdout)")
            XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir).status, 0, image)
            try Tools.must("qemu-img", ["snapshot", "-d", "new snap", ours], in: dir)
            let after = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
            XCTAssertEqual(after.status, 0, "\(image) after qemu-img deleted the snapshot: \(after.stdout)")
        }
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "plain.raw", "1M"], in: dir)
        let raw = try Tools.ferry(["snapshot", "-f", "raw", "-c", "x", "plain.raw"], in: dir)
        XCTAssertEqual(raw.status, 1)
        XCTAssertTrue(raw.stderr.contains("format raw does not support snapshots"), raw.stderr)
    }

    /// `snapshot -d` against qemu-img's on copies of an image with three snapshots (and on
    /// snapshots ferry made): the same listing and failures, clean images, the active layer
    /// and the other snapshots unchanged, the same map.
    func testDeleteMatchesQemuImg() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "d.qcow2", "10M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 2M", "d.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "a", "d.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 2 0 64k", "-c", "write -P 3 5M 1M", "d.qcow2"], in: dir)
        let made = try Tools.ferry(["snapshot", "-c", "b", "d.qcow2"], in: dir)
        XCTAssertEqual(made.status, 0, made.stderr)
        try Tools.must("qemu-io", ["-c", "write -P 4 1M 64k", "d.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "c", "d.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 5 7M 64k", "d.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "raw", "d.qcow2", "active.raw"], in: dir)
        for name in ["a", "b", "c"] { try Tools.must("qemu-img", ["convert", "-O", "raw", "-l", name, "d.qcow2", "\(name).raw"], in: dir) }
        for victim in ["a", "b", "c", "2", "nope"] {
            let (theirs, ours) = try SubcommandGolden.copies(of: "d.qcow2", in: dir)
            let q = try Tools.run(try Tools.require("qemu-img"), ["snapshot", "-d", victim, theirs], in: dir)
            let f = try Tools.ferry(["snapshot", "-d", victim, ours], in: dir)
            XCTAssertEqual(f.status, q.status, "\(victim): \(f.stderr)")
            XCTAssertEqual(f.stderr, q.stderr.replacingOccurrences(of: "qemu-img:", with: "ferry:"), victim)
            let check = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
            XCTAssertEqual(check.status, 0, "\(victim): \(check.stdout)")
            func columns(_ text: String) -> [String] { text.split(separator: "\n").map { String($0.prefix(27)) } }
            XCTAssertEqual(columns(try Tools.must("qemu-img", ["snapshot", "-l", ours], in: dir)),
                           columns(try Tools.must("qemu-img", ["snapshot", "-l", theirs], in: dir)), victim)
            XCTAssertEqual(try Tools.must("qemu-img", ["map", "--output=json", ours], in: dir),
                           try Tools.must("qemu-img", ["map", "--output=json", theirs], in: dir), victim)
            try Tools.must("qemu-img", ["compare", "-f", "raw", "active.raw", ours], in: dir)
            for name in ["a", "b", "c"] where name != victim {
                try Tools.must("qemu-img", ["convert", "-O", "raw", "-l", name, ours, "left-\(name).raw"], in: dir)
                try Tools.must("qemu-img", ["compare", "-f", "raw", "-F", "raw", "\(name).raw", "left-\(name).raw"], in: dir)
            }
        }
        // Every snapshot gone: the active layer's clusters are its own again (COPIED).
        for name in ["a", "b", "c"] {
            let r = try Tools.ferry(["snapshot", "-d", name, "d.qcow2"], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", "d.qcow2"], in: dir).status, 0)
        try Tools.must("qemu-img", ["compare", "-f", "raw", "active.raw", "d.qcow2"], in: dir)
        XCTAssertEqual(try Tools.must("qemu-img", ["snapshot", "-l", "d.qcow2"], in: dir), "")
    }

    /// `snapshot -a` against qemu-img's on copies (by ID and by name, a snapshot taken before
    /// a resize): the same contents, size and map, clean images that take writes afterwards.
    func testApplyMatchesQemuImg() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "d.qcow2", "10M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 2M", "d.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "a", "d.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 2 0 64k", "-c", "write -P 3 5M 1M", "d.qcow2"], in: dir)
        XCTAssertEqual(try Tools.ferry(["snapshot", "-c", "b", "d.qcow2"], in: dir).status, 0)
        try Tools.must("qemu-img", ["resize", "-q", "d.qcow2", "20M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 4 1M 64k", "-c", "write -P 6 15M 64k", "d.qcow2"], in: dir)
        for which in ["a", "b", "1", "2", "nope"] {
            let (theirs, ours) = try SubcommandGolden.copies(of: "d.qcow2", in: dir)
            let q = try Tools.run(try Tools.require("qemu-img"), ["snapshot", "-a", which, theirs], in: dir)
            let f = try Tools.ferry(["snapshot", "-a", which, ours], in: dir)
            XCTAssertEqual(f.status, q.status, "\(which): \(f.stderr)")
            XCTAssertEqual(f.stderr, q.stderr.replacingOccurrences(of: "qemu-img:", with: "ferry:"), which)
            XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir).status, 0, which)
            try Tools.must("qemu-img", ["compare", "-s", theirs, ours], in: dir)
            XCTAssertEqual(try Tools.must("qemu-img", ["map", "--output=json", ours], in: dir),
                           try Tools.must("qemu-img", ["map", "--output=json", theirs], in: dir), which)
            try Tools.must("qemu-io", ["-c", "write -P 9 0 3M", ours], in: dir)
            XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir).status, 0, which)
        }
    }

    func testHelp() throws { try SubcommandGolden.checkHelp("snapshot", in: dir) }
}
