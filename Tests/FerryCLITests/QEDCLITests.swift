import Foundation
import XCTest

/// `ferry` against `qemu-img` on QED images: `info` and `map` print the same bytes, `convert`
/// copies what qemu-img reads, backing chains resolve like qcow2's, broken images are one line.
final class QEDCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("qed") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func qed(_ name: String, _ size: String, options: [String] = [], writes: [String] = []) throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qed"] + options + [name, size], in: dir)
        if !writes.isEmpty {
            try Tools.must("qemu-io", ["-f", "qed"] + writes.flatMap { ["-c", $0] } + [name], in: dir)
        }
    }

    func patch(_ name: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forUpdating: dir.appendingPathComponent(name))
        try h.seek(toOffset: offset)
        try h.write(contentsOf: Data(bytes))
        try h.close()
    }

    static let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 8M 1M", "write -P 0x22 100M 2M", "write -P 0x33 1020M 4M"]

    /// Sparse images with data and zero clusters in several cluster and table sizes, an
    /// overlay over a raw base (the no-probe feature) and one over a qed base.
    func buildImages() throws -> [String] {
        _ = try Tools.require("qemu-io")
        try qed("default.qed", "1G", writes: Self.writes)
        try qed("small.qed", "1G", options: ["-o", "cluster_size=4k,table_size=2"], writes: Self.writes)
        try qed("big.qed", "1G", options: ["-o", "cluster_size=1M,table_size=16"], writes: Self.writes)
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "1G"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 8M", "-c", "write -P 0x78 900M 1M", "base.raw"], in: dir)
        try qed("over-raw.qed", "1G", options: ["-b", "base.raw", "-F", "raw"], writes: ["write -P 0x44 2M 64k", "write -z 4M 64k"])
        try qed("over-qed.qed", "1G", options: ["-b", "default.qed", "-F", "qed"], writes: ["write -P 0x55 1M 64k", "write -z 1020M 1M"])
        return ["default.qed", "small.qed", "big.qed", "over-raw.qed", "over-qed.qed"]
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

    func testConvertMatchesQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        for image in try buildImages() {
            for format in ["raw", "qcow2"] {
                let out = "\(image).\(format)"
                let r = try Tools.ferry(["convert", "-O", format, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -O \(format): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-F", format, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(format): \(cmp.stdout)\(cmp.stderr)")
                if format == "raw" { XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent(out).path), 48 << 20, "\(out) is not sparse") }
                try? FileManager.default.removeItem(at: dir.appendingPathComponent(out))
            }
        }
        // An overlay copied as an overlay of the same base keeps only its own clusters.
        let r = try Tools.ferry(["convert", "-O", "qcow2", "-B", "base.raw", "-F", "raw", "over-raw.qed", "over.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let cmp = try Tools.run(qemu, ["compare", "over-raw.qed", "over.qcow2"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    /// The need-check flag (set by hand in a qemu-made image): the tables are read as they
    /// are, so the copy is the image's data; an entry past the end is still an error.
    func testNeedCheckImageIsReadFromItsTables() throws {
        let qemu = try Tools.require("qemu-img")
        try qed("nc.qed", "64M", writes: ["write -P 0x5a 0 1M", "write -z 2M 64k"])
        try patch("nc.qed", at: 16, [0x02])
        let r = try Tools.ferry(["convert", "-O", "raw", "nc.qed", "nc.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let cmp = try Tools.run(qemu, ["compare", "-f", "qed", "-F", "raw", "nc.qed", "nc.raw"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
        for c in [["info", "--output=json"], ["map", "--output=json"]] {
            XCTAssertEqual(try Tools.ferry(c + ["nc.qed"], in: dir).stdout, try Tools.run(qemu, c + ["nc.qed"], in: dir).stdout)
        }
    }

    func testBackingLoopAndDepthAreRefused() throws {
        try qed("loop-a.qed", "1M")
        try qed("loop-b.qed", "1M", options: ["-b", "loop-a.qed", "-F", "qed"])
        try Tools.must("qemu-img", ["rebase", "-u", "-b", "loop-b.qed", "-F", "qed", "loop-a.qed"], in: dir)
        let loop = try Tools.ferry(["convert", "-O", "raw", "loop-b.qed", "x.raw"], in: dir)
        XCTAssertEqual(loop.status, 1)
        XCTAssertEqual(loop.stderr, "ferry: loop-b.qed: backing chain loops back to 'loop-b.qed', which is already in the chain\n")
        XCTAssertFalse(fileExists(dir.appendingPathComponent("x.raw").path))

        try qed("c0.qed", "1M")
        for i in 1 ... 66 {
            try qed("c\(i).qed", "1M", options: ["-u", "-b", "c\(i - 1).qed", "-F", "qed"])
        }
        let deep = try Tools.ferry(["convert", "-O", "raw", "c66.qed", "x.raw"], in: dir)
        XCTAssertEqual(deep.status, 1)
        XCTAssertTrue(deep.stderr.contains("backing chain is deeper than 64 images"), deep.stderr)
        XCTAssertEqual(deep.stderr.filter { $0 == "\n" }.count, 1)
        // 64 deep is fine.
        let ok = try Tools.ferry(["convert", "-O", "raw", "c63.qed", "y.raw"], in: dir)
        XCTAssertEqual(ok.status, 0, ok.stderr)
    }

    /// Each broken image is one line naming the file, what is wrong and where; exit status 1.
    func testMalformedImagesAreOneClearLine() throws {
        var cases: [(String, String)] = []
        func make(_ name: String, _ edits: [(UInt64, [UInt8])], _ line: String, writes: [String] = ["write -P 1 0 64k"]) throws {
            try qed(name, "4M", writes: writes)
            for (o, b) in edits { try patch(name, at: o, b) }
            cases.append((name, "ferry: \(name): \(line)\n"))
        }
        // qemu's layout: header cluster, L1 at 64 KiB (4 clusters), then the first data cluster
        // at 320 KiB and the first L2 table after it.
        try make("magic.qed", [(0, [0x51, 0x45, 0x45])], "image is in raw format")
        try make("cluster.qed", [(4, [0x00, 0x30, 0x01, 0x00])], "qed header: cluster size 77824 is not a power of two from 4 KiB to 64 MiB at offset 4")
        try make("table.qed", [(8, [17])], "qed header: table size 17 is not 1 to 16 clusters at offset 8")
        try make("features.qed", [(16, [0x08])], "qed image uses unknown incompatible features 0x8, which Ferry cannot read at offset 16")
        try make("l1far.qed", [(40, [0, 0, 0, 0, 1, 0, 0, 0])], "qed header: L1 table at 4294967296 is not cluster-aligned or lies past the end of the file (655360 bytes) at offset 40")
        try make("l1odd.qed", [(40, [0, 2, 1, 0])], "qed header: L1 table at 66048 is not cluster-aligned or lies past the end of the file (655360 bytes) at offset 40")
        try make("size.qed", [(48, [0, 0, 0, 0, 0, 0, 0, 0x40])], "qed header: image size 4611686018427387904 is not a multiple of 512 or exceeds what the tables address (70368744177664) at offset 48")
        try make("backing.qed", [(16, [0x01]), (56, [0xf0, 0xff, 0, 0, 0x20, 0, 0, 0])], "qed header: backing file name (32 bytes at 65520) lies outside the header (65536 bytes) at offset 56")
        try make("l1entry.qed", [(65536, [0, 0, 0, 0, 1, 0, 0, 0])], "qed L1 entry 0 (4294967296) is not cluster-aligned or its L2 table lies past the end of the file (655360 bytes) at offset 65536")
        try make("l2entry.qed", [(393216, [0, 0, 0, 0, 1, 0, 0, 0])], "qed L2 table at 393216: entry 0 (4294967296) is not cluster-aligned or lies past the end of the file (655360 bytes) at offset 393216")
        try make("l2odd.qed", [(393216, [0, 2, 5, 0])], "qed L2 table at 393216: entry 0 (328192) is not cluster-aligned or lies past the end of the file (655360 bytes) at offset 393216")
        FileManager.default.createFile(atPath: dir.appendingPathComponent("short.qed").path, contents: Data(Array("QED\0".utf8) + [1, 2, 3]))
        cases.append(("short.qed", "ferry: short.qed: qed header: the file is shorter than a QED header (7 bytes) at offset 0\n"))

        for (image, line) in cases where image != "magic.qed" {
            for command in [["convert", "-O", "raw", image, "x.raw"], ["map", image]] {
                let r = try Tools.ferry(command, in: dir)
                XCTAssertEqual(r.status, 1, "ferry \(command.joined(separator: " "))")
                XCTAssertFalse(r.signalled)
                // A table entry found broken mid-copy also says the target was removed.
                XCTAssertTrue(r.stderr == line || r.stderr == line.dropLast() + "; the incomplete target was removed\n",
                              "ferry \(command.joined(separator: " ")): \(r.stderr)")
            }
            XCTAssertFalse(fileExists(dir.appendingPathComponent("x.raw").path))
        }
        // A bad magic is not a qed image: with -f qed it is refused as such.
        let r = try Tools.ferry(["info", "-f", "qed", "magic.qed"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: magic.qed: qed header: bad magic (not QED\\0) at offset 0\n")
    }

    // MARK: - Writing

    /// Ferry's QED images in three cluster and table sizes: clean for `qemu-img check`,
    /// identical to the source for `qemu-img compare`, `info` and `map` as qemu-img prints
    /// them, sparse, and read back by Ferry.
    func testFerryWrittenImagesPassCheckAndCompare() throws {
        let qemu = try Tools.require("qemu-img")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "src.qcow2", "100000k"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xab 0 4k", "-c", "write -P 0x11 1M 3M", "-c", "write -z 5M 2M",
                                   "-c", "write -P 0x22 50M 3584", "-c", "write -P 0x33 97M 512k", "src.qcow2"], in: dir)
        for (out, options) in [("d.qed", ""), ("s.qed", "cluster_size=4k,table_size=2"), ("b.qed", "cluster_size=1M,table_size=16")] {
            let r = try Tools.ferry(["convert", "-O", "qed"] + (options.isEmpty ? [] : ["-o", options]) + ["src.qcow2", out], in: dir)
            XCTAssertEqual(r.status, 0, "\(options): \(r.stderr)")
            let check = try Tools.run(qemu, ["check", "-f", "qed", out], in: dir)
            XCTAssertEqual(check.status, 0, "\(out): \(check.stdout)\(check.stderr)")
            XCTAssertTrue(check.stdout.contains("No errors were found on the image."), check.stdout)
            let cmp = try Tools.run(qemu, ["compare", "-F", "qed", "src.qcow2", out], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(out): \(cmp.stdout)\(cmp.stderr)")
            let info = try Tools.run(qemu, ["info", "--output=json", out], in: dir)
            XCTAssertTrue(info.stdout.contains("\"format\": \"qed\""), info.stdout)
            // qemu-img rounds the size up to 512 bytes, and so does Ferry.
            XCTAssertTrue(info.stdout.contains("\"virtual-size\": 102400000,"), info.stdout)
            for c in [["info", "--output=json"], ["map", "--output=json"], ["map"]] {
                let theirs = try Tools.run(qemu, c + [out], in: dir)
                let ours = try Tools.ferry(c + [out], in: dir)
                XCTAssertEqual(ours.stdout, theirs.stdout, "\(out): \(c)")
            }
            // The same layout as qemu-img's own convert (header, L1, then clusters and tables
            // in guest order), so the same size: only clusters with data.
            let reference = "theirs-\(out)"
            try Tools.must("qemu-img", ["convert", "-O", "qed"] + (options.isEmpty ? [] : ["-o", options]) + ["src.qcow2", reference], in: dir)
            XCTAssertEqual(try Tools.ferry(["map", "--output=json", out], in: dir).stdout,
                           try Tools.run(qemu, ["map", "--output=json", reference], in: dir).stdout, "\(out): layout")
            XCTAssertEqual(fileSize(dir.appendingPathComponent(out).path), fileSize(dir.appendingPathComponent(reference).path), "\(out): size")
            let back = try Tools.ferry(["convert", "-O", "raw", out, "\(out).raw"], in: dir)
            XCTAssertEqual(back.status, 0, back.stderr)
            XCTAssertEqual(try Tools.run(qemu, ["compare", "-F", "raw", "src.qcow2", "\(out).raw"], in: dir).status, 0)
        }
    }

    /// Over a backing file (`-B`): what the source has as zeros over the base's data becomes
    /// zero clusters, the rest stays with the base; a raw base is named with the no-probe bit.
    func testOverlaysOverQcow2AndRawBases() throws {
        let qemu = try Tools.require("qemu-img")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x77 0 40M", "base.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "raw", "base.qcow2", "base.raw"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "src.raw", "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 40M", "-c", "write -P 0x12 2M 1M", "-c", "write -z 8M 4M",
                                   "-c", "write -P 0x34 50M 100k", "src.raw"], in: dir)
        for (base, format) in [("base.qcow2", "qcow2"), ("base.raw", "raw")] {
            let out = "over-\(format).qed"
            let r = try Tools.ferry(["convert", "-f", "raw", "-O", "qed", "-B", base, "-F", format, "src.raw", out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertEqual(try Tools.run(qemu, ["check", out], in: dir).status, 0)
            let cmp = try Tools.run(qemu, ["compare", "-f", "raw", "-F", "qed", "src.raw", out], in: dir)
            XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
            let info = try Tools.run(qemu, ["info", "--output=json", out], in: dir)
            XCTAssertTrue(info.stdout.contains("\"backing-filename\": \"\(base)\""), info.stdout)
            XCTAssertEqual(info.stdout.contains("\"backing-filename-format\": \"raw\""), format == "raw", info.stdout)
            // The zeroed 4 MiB over the base's data reads as zero clusters of this layer.
            let map = try Tools.run(qemu, ["map", "--output=json", out], in: dir).stdout
            XCTAssertTrue(map.contains("{ \"start\": 8388608, \"length\": 4194304, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), map)
            XCTAssertEqual(try Tools.ferry(["map", "--output=json", out], in: dir).stdout, map)
        }
    }

    func testBadOptionsAndExistingImagesAreRefused() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "src.raw", "1M"], in: dir)
        for (option, words) in [("cluster_size=2k", "QED cluster size must be within range [4096, 67108864] and power of 2"),
                                ("table_size=3", "QED table size must be within range [1, 16] and power of 2"),
                                ("backing_fmt=raw", "a backing format was given without a backing file")] {
            let r = try Tools.ferry(["convert", "-O", "qed", "-o", option, "src.raw", "out.qed"], in: dir)
            XCTAssertEqual(r.status, 1, option)
            XCTAssertTrue(r.stderr.contains(words), r.stderr)
            XCTAssertFalse(fileExists(dir.appendingPathComponent("out.qed").path))
        }
        // Larger than two levels of 4 KiB tables address (512 * 512 * 4 KiB = 1 GiB).
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "big.raw", "2G"], in: dir)
        let big = try Tools.ferry(["convert", "-O", "qed", "-o", "cluster_size=4k,table_size=1", "big.raw", "out.qed"], in: dir)
        XCTAssertEqual(big.status, 1)
        XCTAssertTrue(big.stderr.contains("less than 1073741824 bytes"), big.stderr)
        // Only new images are written: an existing one is not changed in place.
        try qed("old.qed", "1M")
        let n = try Tools.ferry(["convert", "-n", "-O", "qed", "src.raw", "old.qed"], in: dir)
        XCTAssertEqual(n.status, 1)
        XCTAssertTrue(n.stderr.contains("existing qed images can only be read"), n.stderr)
    }
}
