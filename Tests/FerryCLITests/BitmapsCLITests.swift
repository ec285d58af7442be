import Foundation
import XCTest

/// `convert --bitmaps` against `qemu-img convert --bitmaps`: the same bitmaps (names, flags,
/// granularity, and every bit, as qemu-nbd exports them) in an image qemu-img check finds
/// clean, and the same refusals.
final class BitmapsCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("bitmaps") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// Three bitmaps: b0 recording (64 KiB granules), b1 disabled after some writes (1 MiB),
    /// fine with 512-byte granules (its 16 KiB of bits span several 4 KiB clusters, some all zero).
    func buildSource() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "src.qcow2", "64M"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "-g", "1M", "src.qcow2", "b1"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 7 5M 2M", "src.qcow2"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--disable", "src.qcow2", "b1"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "src.qcow2", "b0"], in: dir)
        try Tools.must("qemu-img", ["bitmap", "--add", "-g", "512", "src.qcow2", "fine"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 1 1M 3M", "-c", "write -P 2 40M 64k", "-c", "write -P 3 63M 512",
                                   "-c", "write -P 4 20M 1k", "src.qcow2"], in: dir)
    }

    /// The dirty ranges of `bitmap` in `image`, as qemu-nbd exports them and nbdinfo maps them.
    func bitmapMap(_ image: String, _ bitmap: String) throws -> String {
        let socket = dir.appendingPathComponent("nbd-\(bitmap).sock").path
        // Without -t, qemu-nbd serves one client and exits; --fork returns once it listens.
        // Without -t qemu-nbd serves one client, then exits.
        let server = try Tools.start(try Tools.require("qemu-nbd"), ["-r", "-f", "qcow2", "-B", bitmap, "-k", socket, image], in: dir)
        for _ in 0 ..< 1000 where !FileManager.default.fileExists(atPath: socket) { usleep(10_000) }
        defer { _ = try? server.wait(timeout: 10) }
        return try Tools.must("nbdinfo", ["--map=qemu:dirty-bitmap:\(bitmap)", "nbd+unix:///?socket=\(socket)"], in: dir)
    }

    func bitmapsInfo(_ image: String) throws -> String {
        let json = try Tools.must("qemu-img", ["info", "--output=json", image], in: dir)
        let top = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let specific = try XCTUnwrap(top["format-specific"] as? [String: Any])
        let data = try XCTUnwrap(specific["data"] as? [String: Any])
        let bitmaps = data["bitmaps"] ?? []
        return String(decoding: try JSONSerialization.data(withJSONObject: bitmaps, options: [.sortedKeys]), as: UTF8.self)
    }

    func testBitmapsCopiedAsQemuImgCopiesThem() throws {
        try buildSource()
        for opts in ["cluster_size=65536", "cluster_size=4096", "cluster_size=2M,refcount_bits=1"] {
            try? FileManager.default.removeItem(at: dir.appendingPathComponent("ours.qcow2"))
            try? FileManager.default.removeItem(at: dir.appendingPathComponent("theirs.qcow2"))
            let r = try Tools.ferry(["convert", "-q", "--bitmaps", "-O", "qcow2", "-o", opts, "src.qcow2", "ours.qcow2"], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            try Tools.must("qemu-img", ["convert", "--bitmaps", "-O", "qcow2", "-o", opts, "src.qcow2", "theirs.qcow2"], in: dir)
            let check = try Tools.run(try Tools.require("qemu-img"), ["check", "ours.qcow2"], in: dir)
            XCTAssertEqual(check.status, 0, "\(opts): \(check.stdout)\(check.stderr)")
            try Tools.must("qemu-img", ["compare", "src.qcow2", "ours.qcow2"], in: dir)
            let info = try bitmapsInfo("ours.qcow2")
            XCTAssertEqual(info, try bitmapsInfo("theirs.qcow2"), opts)
            XCTAssertTrue(info.contains("\"fine\""), info)
            for b in ["b0", "b1", "fine"] {
                let ours = try bitmapMap("ours.qcow2", b)
                XCTAssertEqual(ours, try bitmapMap("theirs.qcow2", b), "\(opts) \(b)")
                XCTAssertEqual(ours, try bitmapMap("src.qcow2", b), "\(opts) \(b)")
                XCTAssertTrue(ours.contains("dirty"), "\(b): \(ours)")
            }
        }
    }

    func testInconsistentBitmapFailsOrIsSkipped() throws {
        try buildSource()
        // Mark b0 in use, as a process that died with the image open leaves it.
        try setFlags(of: "b0", in: "src.qcow2", orWith: 1)
        XCTAssertTrue(try Tools.must("qemu-img", ["info", "src.qcow2"], in: dir).contains("in-use"))

        let r = try Tools.ferry(["convert", "--bitmaps", "-O", "qcow2", "src.qcow2", "out.qcow2"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("Cannot copy inconsistent bitmap 'b0'"), r.stderr)
        XCTAssertTrue(r.stderr.contains("--skip-broken-bitmaps"), r.stderr)
        XCTAssertFalse(fileExists(dir.appendingPathComponent("out.qcow2").path))

        let s = try Tools.ferry(["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "src.qcow2", "out.qcow2"], in: dir)
        XCTAssertEqual(s.status, 0, s.stderr)
        XCTAssertTrue(s.stderr.contains("Skipping inconsistent bitmap 'b0'"), s.stderr)
        let info = try bitmapsInfo("out.qcow2")
        XCTAssertFalse(info.contains("\"b0\""), info)
        XCTAssertTrue(info.contains("\"b1\"") && info.contains("\"fine\""), info)
        try Tools.must("qemu-img", ["check", "out.qcow2"], in: dir)
        XCTAssertEqual(try bitmapMap("out.qcow2", "fine"), try bitmapMap("src.qcow2", "fine"))
    }

    /// A hostile bitmap table (an entry past the end of the file, a wrong size) is one clear
    /// line naming the image and the bitmap, and no target.
    func testMalformedBitmapTableRefused() throws {
        try buildSource()
        let cases: [(String, (inout Data, Int) -> Void, String)] = [
            ("past-end.qcow2", { data, entry in
                let table = u64(data, entry)
                put(&data, table, UInt64(1) << 40, bytes: 8)
            }, "table entry 0 points to"),
            ("size.qcow2", { data, entry in put(&data, entry + 8, 7, bytes: 4) }, "its table has 7 entries"),
            ("reserved.qcow2", { data, entry in
                let table = u64(data, entry)
                put(&data, table, UInt64(u64(data, table)) | 2, bytes: 8)
            }, "reserved bits"),
        ]
        for (name, change, message) in cases {
            try FileManager.default.copyItem(at: dir.appendingPathComponent("src.qcow2"), to: dir.appendingPathComponent(name))
            try editEntry(of: "b0", in: name, change)
            let r = try Tools.ferry(["convert", "--bitmaps", "-O", "qcow2", name, "out.qcow2"], in: dir)
            XCTAssertEqual(r.status, 1, name)
            XCTAssertTrue(r.stderr.contains(name) && r.stderr.contains("bitmap 'b0'") && r.stderr.contains(message), "\(name): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertFalse(fileExists(dir.appendingPathComponent("out.qcow2").path), name)
        }
    }

    func testRefusedBeforeAnythingIsWritten() throws {
        try buildSource()
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "plain.raw", "1M"], in: dir)
        let cases: [(args: [String], message: String)] = [
            (["--bitmaps", "-f", "raw", "-O", "qcow2", "plain.raw", "out"], "Source lacks bitmap support"),
            (["--bitmaps", "-O", "raw", "src.qcow2", "out"], "Format driver 'raw' does not support bitmaps"),
            (["--bitmaps", "-O", "qcow2", "-o", "compat=0.10", "src.qcow2", "out"], "Format driver 'qcow2' does not support bitmaps"),
            (["--skip-broken-bitmaps", "-O", "qcow2", "src.qcow2", "out"], "Use of --skip-broken-bitmaps requires --bitmaps"),
        ]
        for c in cases {
            let r = try Tools.ferry(["convert"] + c.args, in: dir)
            XCTAssertEqual(r.status, 1, c.args.joined(separator: " "))
            XCTAssertTrue(r.stderr.contains(c.message), "\(c.args): \(r.stderr)")
            XCTAssertFalse(fileExists(dir.appendingPathComponent("out").path), c.args.joined(separator: " "))
        }
        // Without --bitmaps nothing is copied, as with qemu-img.
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "none.qcow2", "64M"], in: dir)
        let r = try Tools.ferry(["convert", "-O", "qcow2", "src.qcow2", "none2.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try bitmapsInfo("none2.qcow2"), "[]")
    }

    /// Sets bits in the flags of bitmap `name`'s directory entry.
    func setFlags(of name: String, in image: String, orWith bits: UInt32) throws {
        try editEntry(of: name, in: image) { data, entry in
            let flags = u32(data, entry + 12) | bits
            put(&data, entry + 12, UInt64(flags), bytes: 4)
        }
    }

    /// Lets `change` edit the file's bytes, given where bitmap `name`'s directory entry is
    /// (found through the header's bitmaps extension, as the spec lays it out).
    func editEntry(of name: String, in image: String, _ change: (inout Data, Int) -> Void) throws {
        let url = dir.appendingPathComponent(image)
        var data = try Data(contentsOf: url)
        var pos = Int(u32(data, 100))
        while u32(data, pos) != 0 {
            let length = Int(u32(data, pos + 4))
            if u32(data, pos) == 0x2385_2875 {
                var entry = u64(data, pos + 8 + 16)
                for _ in 0 ..< Int(u32(data, pos + 8)) {
                    let nameSize = Int(data[entry + 18]) << 8 | Int(data[entry + 19])
                    let extra = Int(u32(data, entry + 20))
                    if String(decoding: data[entry + 24 + extra ..< entry + 24 + extra + nameSize], as: UTF8.self) == name {
                        change(&data, entry)
                        try data.write(to: url)
                        return
                    }
                    entry += (24 + extra + nameSize + 7) / 8 * 8
                }
            }
            pos += 8 + (length + 7) / 8 * 8
        }
        XCTFail("no bitmap \(name) in \(image)")
    }
}

private func u32(_ data: Data, _ at: Int) -> UInt32 { data[at ..< at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
private func u64(_ data: Data, _ at: Int) -> Int { Int(data[at ..< at + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }) }
private func put(_ data: inout Data, _ at: Int, _ value: UInt64, bytes: Int) {
    for k in 0 ..< bytes { data[at + k] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (bytes - 1 - k))) }
}
