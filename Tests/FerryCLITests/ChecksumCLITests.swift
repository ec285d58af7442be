import Foundation
import XCTest

/// `ferry checksum`, `convert --checksum` and `compare --checksum`: the blkhash digest of the
/// guest data, judged by a reference computed here independently (Python's hashlib over the
/// raw bytes qemu-img gives), the same for every format and endpoint holding the same data.
final class ChecksumCLITests: XCTestCase {
    var dir: URL!
    private var servers: [RunningProcess] = []

    override func setUpWithError() throws { dir = try makeScratchDirectory("checksum") }
    override func tearDown() {
        for s in servers where s.process.isRunning {
            s.signal(SIGTERM)
            s.process.waitUntilExit()
        }
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// The blkhash construction written out plainly: H(H(b0) || ... || H(bN-1) || le64(size)).
    func reference(_ raw: String, algorithm: String = "sha256") throws -> String {
        let script = """
        import hashlib, struct, sys
        outer, size = hashlib.new(sys.argv[2]), 0
        with open(sys.argv[1], "rb") as f:
            while True:
                block = f.read(65536)
                if not block:
                    break
                outer.update(hashlib.new(sys.argv[2], block).digest())
                size += len(block)
        outer.update(struct.pack("<Q", size))
        print(outer.hexdigest())
        """
        let r = try Tools.run(try Tools.require("python3"), ["-c", script, raw, algorithm], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        return r.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Data, a zero run, holes, and a size that is not a multiple of 64 KiB.
    func source() throws -> String {
        try TestImage(name: "src.raw", size: (40 << 20) + 5000, writes: [
            "write -P 0x11 0 3M", "write -P 0x22 5M 100k", "write -z 6M 2M", "write -P 0x33 17M 4097",
            "write -P 0x44 39M 1M",
        ]).build(in: dir)
    }

    func checksum(_ args: [String], line: UInt = #line) throws -> String {
        let r = try Tools.ferry(["checksum"] + args, in: dir)
        XCTAssertEqual(r.status, 0, r.stderr, line: line)
        let fields = r.stdout.split(separator: " ", omittingEmptySubsequences: true)
        XCTAssertEqual(fields.count, 2, r.stdout, line: line)
        XCTAssertEqual(fields.last.map { String($0).trimmingCharacters(in: .newlines) }, args.last, "blksum's line: digest, two spaces, name", line: line)
        return fields.first.map(String.init) ?? ""
    }

    /// OpenSSL's libcrypto is loaded for a digest, not at every start.
    func testLibcryptoIsLoadedOnlyForDigests() throws {
        let src = try source()
        var (r, libraries) = try Tools.ferryLoading(["convert", "-f", "raw", "-O", "qcow2", src, path("copy.qcow2")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(libraries.contains { $0.hasPrefix("libcrypto") }, "a copy without --checksum loaded libcrypto: \(libraries)")
        (r, libraries) = try Tools.ferryLoading(["checksum", "-f", "qcow2", path("copy.qcow2")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(libraries.contains("libcrypto.so.3"), "a checksum loads libcrypto: \(libraries)")
        XCTAssertEqual(r.stdout.split(separator: " ").first.map(String.init), try reference(src))
    }

    /// Without a usable libcrypto a checksum fails with one line naming it, and a copy without
    /// one still works. (Root only: see Tools.ferryWithout.)
    func testMissingLibcryptoIsAClearError() throws {
        let src = try source()
        for args in [["checksum", "-f", "raw", src], ["convert", "--checksum", "-f", "raw", "-O", "raw", src, path("c.raw")]] {
            let r = try Tools.ferryWithout("libcrypto.so.3", args, in: dir)
            XCTAssertNotEqual(r.status, 0, "\(args)")
            XCTAssertFalse(r.signalled, r.stderr)
            XCTAssertTrue(r.stderr.contains("libcrypto"), r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        }
        XCTAssertFalse(fileExists(path("c.raw")), "a copy that could not checksum left its target")
        let r = try Tools.ferryWithout("libcrypto.so.3", ["convert", "-f", "raw", "-O", "raw", src, path("plain.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try Tools.must("qemu-img", ["compare", "-f", "raw", "-F", "raw", src, path("plain.raw")], in: dir),
                       "Images are identical.\n")
    }

    func testTheSameDigestInEveryFormatAndOverNBD() throws {
        let src = try source()
        let expected = try reference(src)
        XCTAssertEqual(try checksum(["-f", "raw", src]), expected)
        for (format, options) in [("qcow2", ["-c"]), ("qcow2", []), ("vmdk", ["-o", "subformat=streamOptimized"]), ("vpc", ["-o", "force_size=on"]),
                                  ("vhdx", []), ("vdi", []), ("qed", [])] {
            let out = path("out-\(format)\(options.count).img")
            try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", format] + options + [src, out], in: dir)
            XCTAssertEqual(try checksum(["-f", format, out]), expected, "\(format) \(options)")
        }
        let (server, url) = try Tools.nbdkit(["file", src], socket: "nbd", in: dir)
        servers.append(server)
        XCTAssertEqual(try checksum(["-f", "raw", url]), expected, "over NBD")
        // Another digest, any OpenSSL knows, and JSON.
        let r = try Tools.ferry(["checksum", "-f", "raw", "--algorithm", "sha512", "--output", "json", src], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("\"checksum\": \"\(try reference(src, algorithm: "sha512"))\""), r.stdout)
        XCTAssertTrue(r.stdout.contains("\"block-size\": 65536"), r.stdout)
        // One changed byte changes it.
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: src))
        try h.seek(toOffset: 20 << 20)
        try h.write(contentsOf: Data([1]))
        try h.close()
        XCTAssertNotEqual(try checksum(["-f", "raw", src]), expected)
        XCTAssertEqual(try checksum(["-f", "raw", src]), try reference(src))
    }

    /// The digest printed at the end of a copy is the source's, computed from the buffers as
    /// they pass: the same as `ferry checksum` of the target, in the summary and in JSON.
    func testConvertPrintsTheDigestOfWhatItCopied() throws {
        let src = try source()
        let expected = try reference(src)
        for (format, extra) in [("qcow2", [String]()), ("qcow2", ["-c"]), ("raw", ["-W", "-m", "8"]), ("vmdk", ["-o", "subformat=streamOptimized"])] {
            let out = path("c-\(format)\(extra.count)")
            let r = try Tools.ferry(["convert", "--checksum", "-f", "raw", "-O", format] + extra + [src, out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertEqual(r.stdout, "\(expected)  \(out)\n", "\(format) \(extra)")
            XCTAssertTrue(r.stderr.contains(", checksum sha256:\(expected)\n"), r.stderr)
            XCTAssertEqual(try checksum(["-f", format, out]), expected)
        }
        // -q keeps the digest (it was asked for); JSON progress carries it on its last line.
        let q = try Tools.ferry(["convert", "-q", "--checksum=sha1", "-f", "raw", "-O", "raw", src, path("q.raw")], in: dir)
        XCTAssertEqual(q.stdout, "\(try reference(src, algorithm: "sha1"))  \(path("q.raw"))\n")
        XCTAssertEqual(q.stderr, "")
        let j = try Tools.ferry(["convert", "--progress=json", "--checksum", "-f", "raw", "-O", "raw", src, path("j.raw")], in: dir)
        let last = j.stdout.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(last.contains("\"checksum\":\"\(expected)\",\"checksum_algorithm\":\"sha256\""), last)
        XCTAssertTrue(last.contains("\"final\":true"), last)
        // Over a backing file (-B) the copy leaves what the base holds; the digest still covers it.
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", src, path("base.qcow2")], in: dir)
        let b = try Tools.ferry(["convert", "--checksum", "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", src, path("over.qcow2")], in: dir)
        XCTAssertEqual(b.status, 0, b.stderr)
        XCTAssertEqual(b.stdout, "\(expected)  \(path("over.qcow2"))\n")
        // A bad algorithm is refused before anything is created.
        let bad = try Tools.ferry(["convert", "--checksum=md7", "-f", "raw", "-O", "raw", src, path("bad.raw")], in: dir)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("unknown checksum algorithm 'md7'"), bad.stderr)
        XCTAssertFalse(fileExists(path("bad.raw")))
    }

    /// A sparse 1 TiB image: its zero blocks are hashed from one precomputed digest, not read.
    func testHugeSparseImage() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", path("huge.qcow2"), "1T"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 512G 1M", path("huge.qcow2")], in: dir)
        let r = try Tools.ferry(["checksum", "--output", "json", path("huge.qcow2")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("\"virtual-size\": 1099511627776"), r.stdout)
        // Changing the one data block changes the digest.
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5b 512G 1", path("huge.qcow2")], in: dir)
        let again = try Tools.ferry(["checksum", "--output", "json", path("huge.qcow2")], in: dir)
        XCTAssertNotEqual(again.stdout, r.stdout)
    }

    func testCompareByChecksum() throws {
        let src = try source()
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", src, path("same.qcow2")], in: dir)
        let ok = try Tools.ferry(["compare", "--checksum", "-f", "raw", src, path("same.qcow2")], in: dir)
        XCTAssertEqual(ok.status, 0, ok.stdout + ok.stderr)
        XCTAssertEqual(ok.stdout, "Images are identical.\n")
        let digest = try reference(src)
        // A digest printed earlier against an image, and two digests (nothing to read: the
        // names given need not exist).
        XCTAssertEqual(try Tools.ferry(["compare", "--checksum", digest, path("same.qcow2")], in: dir).status, 0)
        XCTAssertEqual(try Tools.ferry(["compare", "--checksum", "sha256:" + digest.uppercased(), digest], in: dir).status, 0)
        let other = String(repeating: "0", count: 64)
        let differ = try Tools.ferry(["compare", "--checksum", "--output", "json", digest, other], in: dir)
        XCTAssertEqual(differ.status, 1)
        XCTAssertTrue(differ.stdout.contains("\"identical\": false"), differ.stdout)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 9 1M 512", path("same.qcow2")], in: dir)
        let changed = try Tools.ferry(["compare", "--checksum", "-f", "raw", src, path("same.qcow2")], in: dir)
        XCTAssertEqual(changed.status, 1)
        XCTAssertTrue(changed.stdout.hasPrefix("Checksum mismatch: sha256 \(digest)"), changed.stdout)
        let missing = try Tools.ferry(["compare", "--checksum", digest, path("nothere.raw")], in: dir)
        XCTAssertEqual(missing.status, 2)
        XCTAssertTrue(missing.stderr.contains("nothere.raw"), missing.stderr)
    }
}
