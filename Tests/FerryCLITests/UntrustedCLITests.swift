import Foundation
import XCTest

/// `--untrusted`: an image from a stranger is read only if it is self-contained. Backing
/// files, external data files and extents are named in the refusal, never opened; a file that
/// two formats claim, or that is given as one format while its bytes say another, is refused;
/// `info --untrusted` gives a verdict a gatekeeper script can read.
final class UntrustedCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("untrusted") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func verdict(_ stdout: String) throws -> (safe: Bool, reasons: [String]) {
        let o = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(stdout.utf8)) as? [String: Any])
        let u = try XCTUnwrap(o["untrusted"] as? [String: Any], stdout)
        return (try XCTUnwrap(u["safe"] as? Bool), try XCTUnwrap(u["reasons"] as? [String]))
    }

    func testSelfContainedImagesPassAndReferencesAreRefused() throws {
        let raw = try TestImage(name: "base.raw", size: 2 << 20, writes: ["write -P 0x61 0 1M"]).build(in: dir)
        let plain = path("plain.qcow2")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, plain], in: dir)

        // Self-contained: safe, and it converts.
        let ok = try Tools.ferry(["info", "--untrusted", "--output=json", plain], in: dir)
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertEqual(try verdict(ok.stdout).safe, true)
        XCTAssertTrue(try Tools.ferry(["info", "--untrusted", plain], in: dir).stdout.hasSuffix("untrusted: safe (self-contained)\n"))
        let c = try Tools.ferry(["convert", "-q", "--untrusted", plain, path("plain.raw")], in: dir)
        XCTAssertEqual(c.status, 0, c.stderr)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", raw, path("plain.raw")], in: dir)

        // A backing file (here /etc/passwd, read as raw): named, unsafe, not followed.
        let overlay = path("overlay.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", overlay, "2M"], in: dir)
        let info = try Tools.ferry(["info", "--untrusted", "--output=json", overlay], in: dir)
        XCTAssertEqual(info.status, 0, info.stderr)
        let v = try verdict(info.stdout)
        XCTAssertFalse(v.safe)
        XCTAssertEqual(v.reasons, ["names the backing file '/etc/passwd'"])
        for args in [["convert", "--untrusted", overlay, path("o.raw")], ["map", "--untrusted", overlay]] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, "\(args)")
            XCTAssertTrue(r.stderr.contains("refers to the backing file '/etc/passwd', which --untrusted does not follow"), r.stderr)
            XCTAssertFalse(FileManager.default.fileExists(atPath: path("o.raw")))
        }
        XCTAssertEqual(try Tools.ferry(["convert", "-q", overlay, path("o.raw")], in: dir).status, 0, "trusted, it is followed")

        // An external data file.
        let external = path("external.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "data_file=\(path("data.bin"))", external, "2M"], in: dir)
        let e = try Tools.ferry(["info", "--untrusted", "--output=json", external], in: dir)
        XCTAssertEqual(e.status, 1)
        XCTAssertTrue(e.stderr.contains("refers to the file '\(path("data.bin"))'"), e.stderr)
        XCTAssertEqual(try verdict(e.stdout).safe, false, "the verdict is printed for a refusal too")

        // A VMDK whose descriptor names its extent (it could name /dev/sda).
        let flat = path("flat.vmdk")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", raw, flat], in: dir)
        let f = try Tools.ferry(["convert", "--untrusted", flat, path("f.raw")], in: dir)
        XCTAssertEqual(f.status, 1)
        XCTAssertTrue(f.stderr.contains("refers to the file"), f.stderr)
        XCTAssertTrue(f.stderr.contains("flat-flat.vmdk"), f.stderr)
    }

    /// A qcow2 image with a dmg trailer is both; a qcow2 image given as raw is a lie.
    func testPolyglotsAndFormatLiesAreRefused() throws {
        let img = path("poly.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", img, "1M"], in: dir)
        var trailer = Data("koly".utf8)
        trailer.append(Data(count: 508))
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: img))
        try h.seekToEnd()
        try h.write(contentsOf: trailer)
        try h.close()
        let r = try Tools.ferry(["info", "--untrusted", img], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("is a valid qcow2 and a valid dmg image at once (a polyglot)"), r.stderr)
        XCTAssertEqual(try Tools.ferry(["info", img], in: dir).status, 0, "trusted, the header decides")

        // qcow2 and an ISO 9660 volume at once (the volume descriptor at 32 KiB).
        let iso = path("iso.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", iso, "1M"], in: dir)
        let ih = try FileHandle(forUpdating: URL(fileURLWithPath: iso))
        try ih.truncate(atOffset: max(try ih.seekToEnd(), 36864))
        try ih.seek(toOffset: 32769)
        try ih.write(contentsOf: Data("CD001".utf8))
        try ih.close()
        let i = try Tools.ferry(["convert", "--untrusted", iso, path("iso.raw")], in: dir)
        XCTAssertEqual(i.status, 1)
        XCTAssertTrue(i.stderr.contains("a valid qcow2 and a valid iso9660 image at once"), i.stderr)
        // A plain ISO is raw data, and safe.
        let plainISO = path("plain.iso")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", plainISO, "64k"], in: dir)
        let ph = try FileHandle(forUpdating: URL(fileURLWithPath: plainISO))
        try ph.seek(toOffset: 32769)
        try ph.write(contentsOf: Data("CD001".utf8))
        try ph.close()
        let p = try Tools.ferry(["info", "--untrusted", "-f", "raw", "--output=json", plainISO], in: dir)
        XCTAssertEqual(p.status, 0, p.stderr)
        XCTAssertEqual(try verdict(p.stdout).safe, true)

        let plain = path("plain.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", plain, "1M"], in: dir)
        let lie = try Tools.ferry(["convert", "--untrusted", "-f", "raw", plain, path("lie.raw")], in: dir)
        XCTAssertEqual(lie.status, 1)
        XCTAssertTrue(lie.stderr.contains("given as raw, but its bytes are a qcow2 image's"), lie.stderr)
    }
}
