import Foundation
import XCTest

/// `ferry measure` against `qemu-img measure` on the same images: the same bytes on stdout,
/// human and JSON, and the same failures.
final class MeasureCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("measure") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// A sparse raw image, the qcow2 qemu-img converts from it, a compat=0.10 copy, an
    /// overlay with a zero cluster and new data, and a qcow2 with persistent bitmaps.
    func buildImages() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "r.raw", "100M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 1 0 1M", "-c", "write -P 2 50M 70k", "-c", "write -P 3 99M 512", "r.raw"], in: dir)
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", "r.raw", "q.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=0.10", "r.raw", "q2.qcow2"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "q.qcow2", "-F", "qcow2", "ov.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -z 0 64k", "-c", "write -P 4 90M 1k", "ov.qcow2"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "qb.qcow2", "100M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 5 4M 3M", "qb.qcow2"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "-g", "64k", "qb.qcow2", "b1"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "-g", "512", "qb.qcow2", "a-longer-bitmap-name"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "v.vmdk", "10M"], in: dir)
    }

    func testImagesMatchQemuImg() throws {
        try buildImages()
        let targets: [[String]] = [
            [], ["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"], ["-O", "qcow2", "-o", "cluster_size=2M"],
            ["-O", "qcow2", "-o", "compat=0.10"], ["-O", "qcow2", "-o", "preallocation=falloc"],
            ["-O", "qcow2", "-o", "refcount_bits=1,extended_l2=on"], ["-O", "raw", "-o", "preallocation=full"],
        ]
        for image in [["-f", "raw", "r.raw"], ["q.qcow2"], ["q2.qcow2"], ["ov.qcow2"], ["qb.qcow2"], ["-f", "raw", "q.qcow2"], ["v.vmdk"]] {
            for t in targets {
                for out in [[], ["--output=json"]] {
                    try SubcommandGolden.sameAsQemuImg(["measure"] + t + out + image, in: dir)
                }
            }
        }
    }

    func testSizesMatchQemuImg() throws {
        for size in ["0", "1000", "1G", "7T", "2P", "1E"] {
            for t in [["-O", "raw"], ["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64"],
                      ["-O", "qcow2", "-o", "cluster_size=1k,refcount_bits=2"], ["-O", "qcow2", "-o", "preallocation=full"],
                      ["-O", "qcow2", "-o", "preallocation=metadata,cluster_size=2M,extended_l2=on"]] {
                for out in [[], ["--output", "json"]] {
                    try SubcommandGolden.sameAsQemuImg(["measure", "--size", size] + t + out, in: dir)
                }
            }
        }
    }

    func testFailuresMatchQemuImg() throws {
        try buildImages()
        for args in [["measure"], ["measure", "--size", "1G", "r.raw"], ["measure", "-O", "vmdk", "-f", "raw", "r.raw"],
                     ["measure", "-O", "vpc", "--size", "1G"], ["measure", "-O", "vhdx", "--size", "1G"],
                     ["measure", "-O", "qcow2", "--size", "1E"]] {
            try SubcommandGolden.sameAsQemuImg(args, in: dir)
        }
        // Ferry's own words, as for convert: one line, exit status 1.
        for args in [["measure", "--size", "abc"], ["measure", "-O", "foo", "--size", "1G"], ["measure", "-O", "qcow2", "-o", "foo=bar", "--size", "1G"],
                     ["measure", "-O", "qcow2", "nonexistent.img"], ["measure", "--size", "1G", "--output", "xml"]] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, args.joined(separator: " "))
            XCTAssertEqual(r.stdout, "")
            XCTAssertTrue(r.stderr.hasPrefix("ferry: "), r.stderr)
        }
    }

    /// `-l`: a snapshot holding less than the active layer measures less, as with qemu-img.
    func testSnapshotMatchesQemuImg() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "s.qcow2", "100M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 0 1M", "s.qcow2"], in: dir)
        try Tools.must("qemu-img", ["snapshot", "-c", "small", "s.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 2 10M 5M", "s.qcow2"], in: dir)
        for l in [["-l", "small"], ["-l", "1"], ["-l", "snapshot.name=small"], ["-l", "snapshot.id=1,snapshot.name=small"], []] {
            for t in [["-O", "qcow2"], ["-O", "qcow2", "--output=json"], ["-O", "raw"]] {
                try SubcommandGolden.sameAsQemuImg(["measure"] + t + l + ["s.qcow2"], in: dir)
            }
        }
        let small = try Tools.ferry(["measure", "-O", "qcow2", "-l", "small", "s.qcow2"], in: dir)
        let all = try Tools.ferry(["measure", "-O", "qcow2", "s.qcow2"], in: dir)
        XCTAssertNotEqual(small.stdout, all.stdout)
    }

    func testHelp() throws {
        try SubcommandGolden.checkHelp("measure", in: dir)
        let r = try Tools.ferry(["measure", "-O", "qcow2", "-o", "help"], in: dir)
        XCTAssertEqual(r.status, 0)
        XCTAssertTrue(r.stdout.contains("cluster_size"), r.stdout)
    }
}
