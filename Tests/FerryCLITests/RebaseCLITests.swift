import Foundation
import XCTest

/// `ferry rebase -u` against `qemu-img rebase -u` on copies of one overlay: the same header,
/// byte for byte, and the same failures; the safe mode is refused and changes nothing.
final class RebaseCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("rebase") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func buildImages() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "b1.qcow2", "10M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 2M", "b1.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "raw", "b1.qcow2", "b2.raw"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "ov.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 3 0 64k", "ov.qcow2"], in: dir)
        // An image with a bitmap: its header extension must survive the rewrite.
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "ovb.qcow2"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "ovb.qcow2", "bm"], in: dir)
    }

    func data(_ name: String) throws -> Data { try Data(contentsOf: dir.appendingPathComponent(name)) }

    func same(_ image: String, _ args: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let (theirs, ours) = try SubcommandGolden.copies(of: image, in: dir)
        let q = try Tools.run(try Tools.require("qemu-img"), args + [theirs], in: dir)
        let f = try Tools.ferry(args + [ours], in: dir)
        let what = args.joined(separator: " ")
        XCTAssertEqual(f.stdout, q.stdout, what, file: file, line: line)
        XCTAssertEqual(f.status, q.status, "\(what): \(f.stderr)", file: file, line: line)
        if image.contains("ovb") {
            // qemu-img stores the bitmaps again on closing (elsewhere in the file): the info
            // (backing file, format, bitmaps) is what must agree.
            let i1 = try Tools.run(try Tools.require("qemu-img"), ["info", "--output=json", theirs], in: dir)
            let i2 = try Tools.run(try Tools.require("qemu-img"), ["info", "--output=json", ours], in: dir)
            func fields(_ s: String) -> [String] {
                s.split(separator: "\n").filter { $0.contains("backing") || $0.contains("\"name\"") }.map { $0.replacingOccurrences(of: ours, with: theirs) }
            }
            XCTAssertEqual(fields(i2.stdout), fields(i1.stdout), what, file: file, line: line)
            XCTAssertTrue(i2.stdout.contains("\"bm\""), i2.stdout, file: file, line: line)
        } else {
            XCTAssertEqual(try data(ours), try data(theirs), "\(what): the images differ", file: file, line: line)
        }
        if q.status == 0, !args.contains("nonexistent.qcow2") {
            let k = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
            XCTAssertEqual(k.status, 0, "\(what): \(k.stdout)", file: file, line: line)
        }
    }

    func testUnsafeMatchesQemuImg() throws {
        try buildImages()
        for image in ["ov.qcow2", "ovb.qcow2"] {
            for args in [["-b", "b2.raw", "-F", "raw"], ["-b", ""], [], ["-b", "nonexistent.qcow2", "-F", "qcow2"],
                         ["-b", dir.appendingPathComponent("b1.qcow2").path, "-F", "qcow2"], ["-f", "qcow2", "-b", "b2.raw", "-F", "raw"],
                         ["-b", "b2.raw"]] {
                try same(image, ["rebase", "-u"] + args, file: #filePath, line: #line)
            }
        }
        // Reading through the new backing file gives what the old one gave.
        try Tools.must("qemu-img", ["rebase", "-u", "-b", "b2.raw", "-F", "raw", "ours-ov.qcow2"], in: dir)
        let before = try Tools.must("qemu-img", ["compare", "ov.qcow2", "ours-ov.qcow2"], in: dir)
        XCTAssertTrue(before.contains("identical"), before)
    }

    func testRefusals() throws {
        try buildImages()
        let original = try data("ov.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2", "snap.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "s", "snap.qcow2"], in: dir)
        for (args, expected) in [(["rebase", "-b", "", "snap.qcow2"], "with internal snapshots safely yet"),
                                 (["rebase", "-b", "b2.raw", "ov.qcow2"], "backing format must be specified"),
                                 (["rebase", "ov.qcow2"], "Must specify backing file (-b) or use unsafe mode (-u)"),
                                 (["rebase", "-u", "-b", "b2.raw", "-F", "foo", "ov.qcow2"], "unknown format 'foo'"),
                                 (["rebase", "-u", "-b", "b2.raw", "-F", "raw", "-f", "raw", "b2.raw"], "does not support option amendment")] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, args.joined(separator: " "))
            XCTAssertTrue(r.stderr.contains(expected), r.stderr)
        }
        XCTAssertEqual(try data("ov.qcow2"), original)
    }

    /// A chain base <- mid <- top, rebased safely onto base, onto nothing, onto mid and onto
    /// a raw image: the top reads as before (against a raw copy made first), qemu-img check
    /// finds it clean, its header names the new backing file, and qemu-img's own safe rebase
    /// of a copy gives the same contents and the same file size.
    func testSafeModeKeepsContents() throws {
        for (name, options) in [("big", "cluster_size=64k"), ("small", "cluster_size=4k")] {
            try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, "\(name)-base.qcow2", "2G"], in: dir)
            try Tools.must("qemu-io", ["-c", "write -P 1 0 4M", "-c", "write -P 2 6M 1M", "-c", "write -P 7 1500M 1M", "\(name)-base.qcow2"], in: dir)
            try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, "-b", "\(name)-base.qcow2", "-F", "qcow2", "\(name)-mid.qcow2"], in: dir)
            try Tools.must("qemu-io", ["-c", "write -P 3 1M 1M", "-c", "write -P 4 8M 64k", "\(name)-mid.qcow2"], in: dir)
            try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "\(name)-new.raw", "1G"], in: dir)
            try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 1 0 512k", "\(name)-new.raw"], in: dir)
            try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", options, "-b", "\(name)-mid.qcow2", "-F", "qcow2", "\(name)-top.qcow2"], in: dir)
            try Tools.must("qemu-io", ["-c", "write -P 5 0 64k", "-c", "write -z 9M 64k", "-c", "write -P 6 3M 100k", "\(name)-top.qcow2"], in: dir)
            try Tools.must("qemu-img", ["convert", "-O", "raw", "\(name)-top.qcow2", "\(name)-expect.raw"], in: dir)
            for (k, args) in [["-b", "\(name)-base.qcow2", "-F", "qcow2"], ["-b", ""], ["-b", "\(name)-mid.qcow2", "-F", "qcow2"],
                              ["-b", "\(name)-new.raw", "-F", "raw"]].enumerated() {
                let ours = "\(name)-ours\(k).qcow2", theirs = "\(name)-theirs\(k).qcow2"
                for copy in [ours, theirs] {
                    try FileManager.default.copyItem(at: dir.appendingPathComponent("\(name)-top.qcow2"), to: dir.appendingPathComponent(copy))
                }
                let r = try Tools.ferry(["rebase"] + args + [ours], in: dir)
                XCTAssertEqual(r.status, 0, r.stderr)
                XCTAssertEqual(r.stdout, "")
                try Tools.must("qemu-img", ["rebase"] + args + [theirs], in: dir)
                let same = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", "raw", "\(name)-expect.raw", ours], in: dir)
                XCTAssertEqual(same.status, 0, "\(args): \(same.stdout)")
                let check = try Tools.run(try Tools.require("qemu-img"), ["check", ours], in: dir)
                XCTAssertEqual(check.status, 0, "\(args): \(check.stdout)")
                let info = try Tools.must("qemu-img", ["info", ours], in: dir)
                XCTAssertEqual(info.contains("backing file: \(args[1])\n"), !args[1].isEmpty, info)
                XCTAssertEqual(fileSize(dir.appendingPathComponent(ours).path), fileSize(dir.appendingPathComponent(theirs).path), "\(args)")
            }
        }
    }

    func testHelp() throws { try SubcommandGolden.checkHelp("rebase", in: dir) }
}
