import Foundation
import XCTest

/// kill -9 at random points while writing each writable format: the target's name never
/// holds an image (it is renamed into place only when complete), a target that existed keeps
/// its old content, and the next copy succeeds over what the killed one left.
final class KilledCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("killed") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Every format `ferry convert -O` writes, with its subformats, from the help's list.
    static let targets: [(String, [String])] = [
        ("raw", []), ("qcow2", []), ("qcow2", ["-c"]), ("vmdk", ["-o", "subformat=monolithicSparse"]),
        ("vmdk", ["-o", "subformat=streamOptimized"]), ("vpc", []), ("vpc", ["-o", "subformat=fixed"]), ("vhdx", []),
        ("vdi", []), ("vdi", ["-o", "static=on"]), ("qed", []),
    ]

    /// The list above names every format ferry writes (as its refusal of a read-only one lists them).
    func testEveryWritableFormatIsKilled() throws {
        let r = try Tools.ferry(["convert", "-O", "parallels", "in.raw", "out.img"], in: dir)
        guard let list = r.stderr.range(of: "(writable formats: ").map({ r.stderr[$0.upperBound...].prefix { $0 != ")" } }) else {
            return XCTFail("no list of writable formats in: \(r.stderr)")
        }
        let formats = list.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        XCTAssertTrue(formats.contains("qed"), r.stderr)
        for format in formats {
            XCTAssertTrue(Self.targets.contains { $0.0 == format }, "\(format) is never killed mid-copy here")
        }
    }

    func testKilledCopiesNeverLeaveAnImageUnderTheTargetName() throws {
        let src = try TestImage(name: "src.raw", size: 64 << 20, writes: ["write -P 0x5a 0 30M", "write -P 0xa5 40M 20M"]).build(in: dir)
        let old = path("old.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", old, "1M"], in: dir)
        var rng = SystemRandomNumberGenerator()
        var killed = 0
        for (k, (format, extra)) in Self.targets.enumerated() {
            // A fresh name, and one that exists already (its old bytes must survive the kill).
            for existing in [false, true] {
                let dst = path("t\(k)-\(existing).\(format)")
                if existing { try FileManager.default.copyItem(atPath: old, toPath: dst) }
                // -r spreads the copy over about 2 s; the kill lands somewhere in it.
                let p = try Tools.start(try Tools.require("ferry"),
                                        ["convert", "-q", "-r", "25M", "-f", "raw", "-O", format] + extra + [src, dst], in: dir)
                usleep(UInt32.random(in: 100_000 ... 1_500_000, using: &rng))
                guard p.process.isRunning else { continue }
                p.signal(SIGKILL)
                let r = try p.wait(timeout: 10)
                XCTAssertTrue(r.signalled, "\(format) \(extra)")
                killed += 1
                if existing {
                    XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dst)), try Data(contentsOf: URL(fileURLWithPath: old)),
                                   "\(format) \(extra): the old target is untouched")
                } else {
                    XCTAssertFalse(fileExists(dst), "\(format) \(extra): nothing under the target's name")
                }
                XCTAssertTrue(fileExists(dst + ".ferry-partial"), "\(format) \(extra): what was written is beside it, in plain sight")
                // The next copy reuses the leftover and puts a complete image in place.
                let again = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", format] + extra + [src, dst], in: dir, timeout: 120)
                XCTAssertEqual(again.status, 0, again.stderr)
                XCTAssertFalse(fileExists(dst + ".ferry-partial"))
                try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", format, src, dst], in: dir)
            }
        }
        XCTAssertGreaterThan(killed, Self.targets.count, "most copies were killed mid-way")
    }

    /// An overwritten target keeps its mode and owner, and a symbolic link stays one.
    func testReplacedTargetKeepsModeAndLinks() throws {
        let src = try TestImage(name: "src.raw", size: 4 << 20, writes: ["write -P 0x11 0 1M"]).build(in: dir)
        let real = path("real.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", real, "1M"], in: dir)
        XCTAssertEqual(chmod(real, 0o640), 0)
        XCTAssertEqual(chown(real, 65534, 65534), 0)
        try FileManager.default.createSymbolicLink(atPath: path("link.raw"), withDestinationPath: real)
        let r = try Tools.ferry(["convert", "-q", "-f", "raw", src, path("link.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: path("link.raw")), real, "still a link")
        var st = stat()
        XCTAssertEqual(stat(real, &st), 0)
        XCTAssertEqual(st.st_mode & 0o7777, 0o640)
        XCTAssertEqual([st.st_uid, st.st_gid], [65534, 65534])
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, real], in: dir)
    }
}
