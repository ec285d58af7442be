import Foundation
import XCTest

/// `ferry` against `qemu-img` on qcow2 images: `info` (human, JSON, `--backing-chain`) and
/// `map` print the same bytes; `convert` probes qcow2 and copies what qemu-img copies; broken
/// images give one clear line and a failure status.
final class QCOW2CLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("qcow2") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func qcow2(_ name: String, _ size: String, options: String = "", writes: [String] = []) throws {
        var args = ["create", "-q", "-f", "qcow2"]
        if !options.isEmpty { args += ["-o", options] }
        try Tools.must("qemu-img", args + [name, size], in: dir)
        if !writes.isEmpty {
            var io = ["-f", "qcow2"]
            for w in writes { io += ["-c", w] }
            try Tools.must("qemu-io", io + [name], in: dir)
        }
    }

    /// A chain: base.raw (1 MiB) <- sub/mid.qcow2 <- top.qcow2, relative names; and a few
    /// single images of other kinds.
    func buildImages() throws -> [String] {
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("sub"), withIntermediateDirectories: true)
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "1M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x01 0 512k", "base.raw"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", "sub/mid.qcow2", "3M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x02 256k 64k", "-c", "write -z 2M 64k", "sub/mid.qcow2"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", "-o", "extended_l2=on", "top.qcow2", "4M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x03 8k 4k", "-c", "write -c -P 0x04 1M 64k", "-c", "write -P 0x05 3M 64k", "top.qcow2"], in: dir)
        try qcow2("v2.qcow2", "1000000", options: "compat=0.10,cluster_size=4096", writes: ["write -P 0x21 0 10k", "write -P 0x22 999424 576"])
        try qcow2("zstd.qcow2", "2M", options: "compression_type=zstd,refcount_bits=1,lazy_refcounts=on", writes: ["write -c -P 0x31 0 128k", "write -z 1M 64k"])
        try qcow2("data.qcow2", "2M", options: "data_file=data.bin,data_file_raw=on", writes: ["write -P 0x41 64k 64k"])
        try qcow2("snap.qcow2", "1M", writes: ["write -P 0x51 0 64k"])
        try Tools.must("qemu-img", ["snapshot", "-c", "s1", "snap.qcow2"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "snap.qcow2", "b1"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x52 0 64k", "snap.qcow2"], in: dir)
        return ["top.qcow2", "sub/mid.qcow2", "v2.qcow2", "zstd.qcow2", "data.qcow2", "snap.qcow2"]
    }

    func testInfoMatchesQemuImg() throws {
        let images = try buildImages()
        // A dirty image (lazy refcounts after a crash): the dirty bit set by hand.
        try qcow2("dirty.qcow2", "1M", options: "lazy_refcounts=on", writes: ["write -P 0x61 0 4k"])
        let h = try FileHandle(forUpdating: dir.appendingPathComponent("dirty.qcow2"))
        try h.seek(toOffset: 79)
        try h.write(contentsOf: Data([1]))
        try h.close()
        for image in images + ["dirty.qcow2"] {
            for extra in [[], ["--output=json"], ["--backing-chain"], ["--backing-chain", "--output=json"]] {
                let ours = try Tools.ferry(["info"] + extra + [image], in: dir)
                let theirs = try Tools.run(try Tools.require("qemu-img"), ["info"] + extra + [image], in: dir)
                XCTAssertEqual(ours.status, 0, "ferry info \(extra) \(image): \(ours.stderr)")
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry info \(extra.joined(separator: " ")) \(image)")
                XCTAssertEqual(ours.stderr, "", "ferry info \(image)")
            }
        }
    }

    func testMapMatchesQemuImg() throws {
        for image in try buildImages() {
            for extra in [["--output=json"], []] {
                let ours = try Tools.ferry(["map"] + extra + [image], in: dir)
                let theirs = try Tools.run(try Tools.require("qemu-img"), ["map"] + extra + [image], in: dir)
                // The human form names the file each run lives in (the image, a backing
                // file, the data file) and, like qemu-img, fails at the first compressed run.
                XCTAssertEqual(ours.status, theirs.status, "ferry map \(extra) \(image): \(ours.stderr)")
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry map \(extra.joined(separator: " ")) \(image)")
            }
        }
    }

    func testConvertProbesQcow2AndCopiesWhatQemuImgCopies() throws {
        for image in try buildImages() {
            let out = image.replacingOccurrences(of: "/", with: "-") + ".raw"
            let r = try Tools.ferry(["convert", "-O", "raw", image, out], in: dir)
            XCTAssertEqual(r.status, 0, "ferry convert \(image): \(r.stderr)")
            XCTAssertTrue(OracleTests.isSummary(r.stderr), "ferry convert \(image): \(r.stderr)")
            let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-F", "raw", image, out], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(image): \(cmp.stdout)\(cmp.stderr)")
        }
        // Explicit -f qcow2 works the same; -f raw on a qcow2 file copies the file as it is.
        let r = try Tools.ferry(["convert", "-q", "-f", "qcow2", "-O", "raw", "zstd.qcow2", "z.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["compare", "-F", "raw", "zstd.qcow2", "z.raw"], in: dir).status, 0)
    }

    func testHugeSparseImageConvertsInAMoment() throws {
        try qcow2("huge.qcow2", "1T", writes: ["write -P 0x61 0 1M", "write -P 0x62 600G 1M", "write -P 0x63 1099510579200 1M"])
        let started = Date()
        let r = try Tools.ferry(["convert", "-O", "raw", "huge.qcow2", "huge.raw"], in: dir)
        let elapsed = Date().timeIntervalSince(started)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("read 3 MiB"), r.stderr)
        XCTAssertLessThan(elapsed, 5, "converting a 1 TiB image with 3 MiB of data took \(elapsed) s")
        XCTAssertEqual(fileSize(dir.appendingPathComponent("huge.raw").path), 1 << 40)
        XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent("huge.raw").path), 8 << 20)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-F", "raw", "huge.qcow2", "huge.raw"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    func testInfoWithoutTheBackingFile() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", "miss.qcow2", "1M"], in: dir)
        for extra in [[], ["--output=json"]] {
            let ours = try Tools.ferry(["info"] + extra + ["miss.qcow2"], in: dir)
            let theirs = try Tools.run(try Tools.require("qemu-img"), ["info"] + extra + ["miss.qcow2"], in: dir)
            XCTAssertEqual(ours.status, 0, ours.stderr)
            XCTAssertEqual(ours.stdout, theirs.stdout)
        }
        // Reading it (or its whole chain) needs the backing file.
        let chain = try Tools.ferry(["info", "--backing-chain", "miss.qcow2"], in: dir)
        XCTAssertEqual(chain.status, 1)
        XCTAssertTrue(chain.stderr.contains("gone.raw"), chain.stderr)
        let r = try Tools.ferry(["convert", "-O", "raw", "miss.qcow2", "out.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("gone.raw"), r.stderr)
    }

    func testBackingWithoutFormatWarns() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "b.img", "1M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "b.img", "-F", "raw", "o.qcow2", "1M"], in: dir)
        // Rename the backing format extension to an unknown type (it is the first extension).
        let h = try FileHandle(forUpdating: dir.appendingPathComponent("o.qcow2"))
        try h.seek(toOffset: 112)
        XCTAssertEqual(try h.read(upToCount: 4), Data([0xE2, 0x79, 0x2A, 0xCA]))
        try h.seek(toOffset: 112)
        try h.write(contentsOf: Data([0x12, 0x34, 0x56, 0x78]))
        try h.close()
        let r = try Tools.ferry(["convert", "-O", "raw", "o.qcow2", "o.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("warning: o.qcow2: the backing file 'b.img' has no format in the image header and probing guessed raw"), r.stderr)
    }

    func testMalformedImagesGiveOneClearLine() throws {
        try qcow2("short.qcow2", "1M")
        try FileHandle(forUpdating: dir.appendingPathComponent("short.qcow2")).truncate(atOffset: 40)
        try qcow2("far.qcow2", "1M", writes: ["write -P 1 0 64k"])
        // L1 table offset (bytes 40-47) far past the end of the file.
        let h = try FileHandle(forUpdating: dir.appendingPathComponent("far.qcow2"))
        try h.seek(toOffset: 40)
        try h.write(contentsOf: Data([0, 0, 1, 0, 0, 0, 0, 0]))
        try h.close()
        try qcow2("loop-a.qcow2", "1M")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", "loop-b.qcow2", "1M"], in: dir)
        try Tools.must("qemu-img", ["rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", "loop-a.qcow2"], in: dir)
        let cases: [(String, String)] = [
            ("short.qcow2", "ferry: short.qcow2: qcow2 header is truncated (40 of 72 bytes) at offset 0\n"),
            ("far.qcow2", "ferry: far.qcow2: qcow2 L1 table at 1099511627776 (8 bytes) lies past the end of the file (393216 bytes) at offset 40\n"),
            ("loop-b.qcow2", "ferry: loop-b.qcow2: backing chain loops back to 'loop-b.qcow2', which is already in the chain\n"),
        ]
        for (image, line) in cases {
            // info alone does not open the backing chain (as qemu-img), so a loop shows with
            // --backing-chain.
            let info = image.hasPrefix("loop") ? ["info", "--backing-chain", image] : ["info", image]
            for command in [["convert", "-O", "raw", image, "x.raw"], info, ["map", image]] {
                let r = try Tools.ferry(command, in: dir)
                XCTAssertEqual(r.status, 1, "ferry \(command.joined(separator: " "))")
                XCTAssertFalse(r.signalled)
                XCTAssertEqual(r.stderr, line, "ferry \(command.joined(separator: " "))")
            }
            XCTAssertFalse(fileExists(dir.appendingPathComponent("x.raw").path))
        }
    }
}
