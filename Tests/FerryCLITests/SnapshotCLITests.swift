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
                                 (["snapshot", "-c", "x", "sn.qcow2"], "-c is not supported yet"),
                                 (["snapshot", "-l", "-d", "x", "sn.qcow2"], "Cannot mix")] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, args.joined(separator: " "))
            XCTAssertTrue(r.stderr.contains(expected), r.stderr)
            XCTAssertFalse(fileExists(dir.appendingPathComponent("o.raw").path))
        }
        // Nothing was changed.
        try SubcommandGolden.sameAsQemuImg(["snapshot", "-l", "sn.qcow2"], in: dir)
    }

    func testHelp() throws { try SubcommandGolden.checkHelp("snapshot", in: dir) }
}
