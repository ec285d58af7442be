import Foundation
import XCTest
import FerryTestServers

/// `ferry` on OVA appliances read in place: `convert X.ova/DISK`, `info X.ova`, the manifest's
/// digests, and broken archives.
final class OVACLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("ova") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// base.raw (3 MiB with data, a hole and a run of zeros), disk1.qcow2 made from it by
    /// qemu-img, and disk2.raw a copy.
    func buildDisks() throws {
        try TestImage(name: "base.raw", size: 3 << 20,
                      writes: ["write -P 0xab 0 64k", "write -P 0x11 1M 300k", "write -P 0 2M 64k", "write -P 0x5a 3071k 1k"]).build(in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "qcow2", "base.raw", "disk1.qcow2"], in: dir)
        try FileManager.default.copyItem(atPath: path("base.raw"), toPath: path("disk2.raw"))
    }

    func writeOVF(_ name: String = "app.ovf", disks: [String] = ["disk1.qcow2", "disk2.raw"]) throws {
        let files = disks.enumerated().map { "    <File ovf:href=\"\($0.element)\" ovf:id=\"file\($0.offset + 1)\"/>" }.joined(separator: "\n")
        let xml = """
        <?xml version="1.0" encoding="UTF-8"?>
        <Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
          <References>
        \(files)
          </References>
        </Envelope>

        """
        try xml.write(toFile: path(name), atomically: true, encoding: .utf8)
    }

    /// A manifest of `files` made with sha1sum or sha256sum.
    func writeManifest(_ name: String = "app.mf", files: [String], tool: String = "sha256sum", algorithm: String = "SHA256") throws {
        var text = ""
        for f in files {
            let out = try Tools.must(tool, [f], in: dir)
            text += "\(algorithm)(\(f))= \(out.prefix(while: { $0 != " " }))\n"
        }
        try text.write(toFile: path(name), atomically: true, encoding: .utf8)
    }

    /// app.ova: app.ovf, disk1.qcow2, disk2.raw and (unless `manifest` is false) app.mf, by GNU tar.
    func buildOVA(_ name: String = "app.ova", manifest: Bool = true) throws {
        try buildDisks()
        try writeOVF()
        var members = ["app.ovf", "disk1.qcow2", "disk2.raw"]
        if manifest {
            try writeManifest(files: members)
            members.append("app.mf")
        }
        try Tools.must("tar", ["--format=ustar", "-cf", name] + members, in: dir)
    }

    func compare(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Tools.run(try Tools.require("qemu-img"), ["compare", a, b], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img compare \(a) \(b): \(r.stdout) \(r.stderr)", file: file, line: line)
    }

    // MARK: - convert

    func testConvertDisksInsideAnOVAToRawAndQcow2() throws {
        try buildOVA()
        var r = try Tools.ferry(["convert", "-O", "raw", "app.ova/disk1.qcow2", "out.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("ferry: app.ova/disk1.qcow2: SHA256 digest matches the manifest"), r.stderr)
        try compare("out.raw", "base.raw")
        r = try Tools.ferry(["convert", "-O", "qcow2", "app.ova/disk1.qcow2", "out.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare("out.qcow2", "base.raw")
        r = try Tools.ferry(["convert", "-f", "raw", "-O", "qcow2", "app.ova/disk2.raw", "out2.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("SHA256 digest matches"), r.stderr)
        try compare("out2.qcow2", "base.raw")
        // A disk inside an OVA can be described and mapped like any image.
        r = try Tools.ferry(["info", "--output=json", "app.ova/disk1.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("\"virtual-size\": 3145728"), r.stdout)
        XCTAssertTrue(r.stdout.contains("\"format\": \"qcow2\""), r.stdout)
    }

    func testSHA1ManifestInATarfileMadeArchiveWithADirectory() throws {
        try buildDisks()
        try writeOVF("vm.ovf", disks: ["disks/disk1.qcow2"])
        try FileManager.default.createDirectory(atPath: path("disks"), withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: path("disk1.qcow2"), toPath: path("disks/disk1.qcow2"))
        try writeManifest("vm.mf", files: ["vm.ovf", "disks/disk1.qcow2"], tool: "sha1sum", algorithm: "SHA1")
        let script = """
        import tarfile, sys
        with tarfile.open('vm.ova', 'w', format=tarfile.PAX_FORMAT) as t:
            for n in ('vm.ovf', 'disks', 'vm.mf'):
                t.add(n)
        """
        try Tools.must("python3", ["-c", script], in: dir)
        let r = try Tools.ferry(["convert", "-O", "raw", "vm.ova/disks/disk1.qcow2", "out.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("vm.ova/disks/disk1.qcow2: SHA1 digest matches the manifest"), r.stderr)
        try compare("out.raw", "base.raw")
    }

    func testManifestMismatchFailsTheConvertAndLeavesNoTarget() throws {
        try buildDisks()
        try writeOVF()
        try writeManifest(files: ["app.ovf", "disk1.qcow2", "disk2.raw"])
        // One digit of disk1's digest changed.
        var text = try String(contentsOfFile: path("app.mf"), encoding: .utf8)
        let lines = text.split(separator: "\n").map { line -> String in
            guard line.contains("disk1") else { return String(line) }
            return String(line.dropLast()) + (line.last == "0" ? "1" : "0")
        }
        text = lines.joined(separator: "\n") + "\n"
        try text.write(toFile: path("app.mf"), atomically: true, encoding: .utf8)
        try Tools.must("tar", ["--format=ustar", "-cf", "bad.ova", "app.ovf", "disk1.qcow2", "disk2.raw", "app.mf"], in: dir)

        for target in ["out.raw", "out.qcow2"] {
            let r = try Tools.ferry(["convert", "-O", target.hasSuffix("raw") ? "raw" : "qcow2", "bad.ova/disk1.qcow2", target], in: dir)
            XCTAssertEqual(r.status, 1, r.stderr)
            XCTAssertFalse(fileExists(path(target)), "\(target) was left behind")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.hasPrefix("ferry: bad.ova/disk1.qcow2: SHA256 digest does not match the manifest"), r.stderr)
            XCTAssertTrue(r.stderr.contains("the incomplete target was removed"), r.stderr)
        }
        // The other disk's digest is right: its convert succeeds.
        let ok = try Tools.ferry(["convert", "-f", "raw", "bad.ova/disk2.raw", "ok.raw"], in: dir)
        XCTAssertEqual(ok.status, 0, ok.stderr)

        let info = try Tools.ferry(["info", "bad.ova"], in: dir)
        XCTAssertEqual(info.status, 1)
        XCTAssertTrue(info.stdout.contains("    [1] disk1.qcow2\n"), info.stdout)
        XCTAssertTrue(info.stdout.contains("        digest: MISMATCH (SHA256)\n"), info.stdout)
        XCTAssertTrue(info.stdout.contains("        digest: matched (SHA256)\n"), info.stdout)
        XCTAssertTrue(info.stderr.contains("ferry: bad.ova: SHA256 digest of 'disk1.qcow2' does not match the manifest 'app.mf'"), info.stderr)
        let json = try Tools.ferry(["info", "--output=json", "bad.ova"], in: dir)
        XCTAssertEqual(json.status, 1)
        let members = try XCTUnwrap(try parse(json.stdout)["members"] as? [[String: Any]])
        XCTAssertEqual(members[1]["digest"] as? String, "mismatch")
        XCTAssertEqual(members[2]["digest"] as? String, "matched")
    }

    func testWithoutAManifestNothingIsVerifiedAndThatIsSaid() throws {
        try buildOVA(manifest: false)
        let r = try Tools.ferry(["convert", "app.ova/disk1.qcow2", "out.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("app.ova/disk1.qcow2: the archive has no manifest; the disk was not verified"), r.stderr)
        try compare("out.raw", "base.raw")
        let info = try Tools.ferry(["info", "app.ova"], in: dir)
        XCTAssertEqual(info.status, 0, info.stderr)
        XCTAssertTrue(info.stdout.contains("manifest: none\n"), info.stdout)
        XCTAssertTrue(info.stdout.contains("        digest: no manifest\n"), info.stdout)
    }

    // MARK: - info

    func parse(_ json: String) throws -> [String: Any] {
        try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
    }

    func testInfoListsTheDisksOfAnOVA() throws {
        try buildOVA()
        let size = fileSize(path("app.ova"))
        let qcowSize = fileSize(path("disk1.qcow2"))
        let r = try Tools.ferry(["info", "app.ova"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stderr, "")
        XCTAssertTrue(r.stdout.hasPrefix("archive: app.ova\nfile format: ova\narchive size: "), r.stdout)
        for line in ["archive size: ", "(\(size) bytes)\n", "descriptor: app.ovf\n", "manifest: app.mf\n", "disks: 2\n",
                     "Members:\n    [0] app.ovf\n",
                     "    [1] disk1.qcow2\n        size: ", "(\(qcowSize) bytes) at offset 1536\n        digest: matched (SHA256)\n        disk:\n            image: app.ova/disk1.qcow2\n            file format: qcow2\n            virtual size: 3 MiB (3145728 bytes)\n",
                     "    [2] disk2.raw\n", "            image: app.ova/disk2.raw\n            file format: raw\n",
                     "    [3] app.mf\n", "        digest: this is the manifest\n"] {
            XCTAssertTrue(r.stdout.contains(line), "missing '\(line)' in:\n\(r.stdout)")
        }

        let j = try Tools.ferry(["info", "--output=json", "app.ova"], in: dir)
        XCTAssertEqual(j.status, 0, j.stderr)
        let o = try parse(j.stdout)
        XCTAssertEqual(o["format"] as? String, "ova")
        XCTAssertEqual(o["filename"] as? String, "app.ova")
        XCTAssertEqual((o["size"] as? NSNumber)?.int64Value, size)
        XCTAssertEqual(o["descriptor"] as? String, "app.ovf")
        XCTAssertEqual(o["manifest"] as? String, "app.mf")
        let members = try XCTUnwrap(o["members"] as? [[String: Any]])
        XCTAssertEqual(members.map { $0["name"] as? String }, ["app.ovf", "disk1.qcow2", "disk2.raw", "app.mf"])
        XCTAssertEqual(members.map { $0["digest"] as? String }, ["matched", "matched", "matched", "manifest"])
        XCTAssertEqual((members[1]["offset"] as? NSNumber)?.int64Value, 1536)
        XCTAssertEqual((members[1]["size"] as? NSNumber)?.int64Value, qcowSize)
        let disk = try XCTUnwrap(members[1]["disk"] as? [String: Any])
        XCTAssertEqual(disk["format"] as? String, "qcow2")
        XCTAssertEqual((disk["virtual-size"] as? NSNumber)?.int64Value, 3 << 20)
        XCTAssertEqual(disk["filename"] as? String, "app.ova/disk1.qcow2")
        XCTAssertNil(members[0]["disk"])
        XCTAssertEqual((members[2]["disk"] as? [String: Any])?["format"] as? String, "raw")
    }

    // MARK: - Broken archives and wrong names

    func testBrokenArchivesGiveOneLineNamingTheFileStructureAndOffset() throws {
        try buildOVA()
        let good = try Data(contentsOf: dir.appendingPathComponent("app.ova"))

        // A flipped byte in disk1.qcow2's header (at 1024: app.ovf's header and data come first).
        var bad = good
        bad[1024 + 3] ^= 0x01
        try bad.write(to: dir.appendingPathComponent("sum.ova"))
        var r = try Tools.ferry(["convert", "sum.ova/disk2.raw", "x.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: sum.ova: tar header at offset 1024 has a bad checksum\n")
        XCTAssertFalse(fileExists(path("x.raw")))
        r = try Tools.ferry(["info", "sum.ova"], in: dir)
        XCTAssertEqual(r.stderr, "ferry: sum.ova: tar header at offset 1024 has a bad checksum\n")
        XCTAssertEqual(r.stdout, "")

        // The first header damaged: still reported as a damaged archive, not read as a raw disk.
        bad = good
        bad[5] ^= 0x01
        try bad.write(to: dir.appendingPathComponent("first.ova"))
        r = try Tools.ferry(["info", "first.ova"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: first.ova: tar header at offset 0 has a bad checksum\n")
        r = try Tools.ferry(["convert", "first.ova", "x.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: first.ova: tar header at offset 0 has a bad checksum\n")

        // Cut inside disk2.raw's data: its size now runs past the end of the file.
        let disk2Header = 1536 + Int(fileSize(path("disk1.qcow2")))
        try good.prefix(disk2Header + 512 + 4096).write(to: dir.appendingPathComponent("short.ova"))
        r = try Tools.ferry(["convert", "short.ova/disk1.qcow2", "x.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: short.ova: tar member at offset \(disk2Header) claims 3145728 bytes of data, past the end of the file (\(disk2Header + 512 + 4096) bytes)\n")

        // Cut inside a header.
        try good.prefix(disk2Header + 100).write(to: dir.appendingPathComponent("cut.ova"))
        r = try Tools.ferry(["info", "cut.ova"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: cut.ova: tar header at offset \(disk2Header) is truncated: the file ends 100 bytes into it\n")

        // A member that is not there, the archive where a disk is expected, a write into it.
        r = try Tools.ferry(["convert", "app.ova/disk3.vmdk", "x.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: app.ova: no member 'disk3.vmdk' in the archive (members: app.ovf, disk1.qcow2, disk2.raw, app.mf)\n")
        r = try Tools.ferry(["convert", "app.ova", "x.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: app.ova: this is an OVA (tar) archive, not a disk image; name a disk inside it, as 'app.ova/disk1.qcow2' (disks: disk1.qcow2, disk2.raw)\n")
        r = try Tools.ferry(["convert", "-f", "raw", "base.raw", "app.ova/new.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: app.ova/new.raw: cannot write into 'app.ova': a disk inside an OVA or tar archive is read-only\n")
        XCTAssertEqual(try Data(contentsOf: dir.appendingPathComponent("app.ova")), good)
        XCTAssertFalse(fileExists(path("x.raw")))
    }

    /// Needs the VMDK reader (another branch): until it is merged this fails with
    /// "vmdk images cannot be read yet".
    func testVMDKInsideOVA() throws {
        try buildDisks()
        try Tools.must("qemu-img", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "base.raw", "disk1.vmdk"], in: dir)
        try writeOVF(disks: ["disk1.vmdk"])
        try writeManifest(files: ["app.ovf", "disk1.vmdk"])
        try Tools.must("tar", ["--format=ustar", "-cf", "vm.ova", "app.ovf", "disk1.vmdk", "app.mf"], in: dir)
        let r = try Tools.ferry(["convert", "-f", "vmdk", "-O", "raw", "vm.ova/disk1.vmdk", "out.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("SHA256 digest matches the manifest"), r.stderr)
        try compare("out.raw", "base.raw")
    }

    /// A disk inside an OVA on an NFS server (ganesha on loopback), named by URL.
    func testDiskInsideAnOVAOnNFS() throws {
        let server = try NFSServer(name: "cli-ova", nfsPort: 2074, mountPort: 20074)
        defer { server.stop() }
        try buildOVA()
        try FileManager.default.copyItem(atPath: path("app.ova"), toPath: "\(server.exportDir)/app.ova")
        var r = try Tools.ferry(["convert", "-O", "raw", server.v3("app.ova/disk1.qcow2"), "out.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("SHA256 digest matches the manifest"), r.stderr)
        try compare("out.raw", "base.raw")
        r = try Tools.ferry(["info", server.v3("app.ova")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("disks: 2\n"), r.stdout)
        XCTAssertTrue(r.stdout.contains("            image: nfs://127.0.0.1/export/app.ova/disk1.qcow2?nfsport=2074&mountport=20074\n            file format: qcow2\n"), r.stdout)
        XCTAssertEqual(r.stdout.components(separatedBy: "digest: matched (SHA256)").count, 4, r.stdout)
        r = try Tools.ferry(["convert", server.v3("app.ova"), "out3.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("name a disk inside it, as 'nfs://127.0.0.1/export/app.ova/disk1.qcow2?nfsport=2074&mountport=20074'"), r.stderr)
        r = try Tools.ferry(["convert", "-O", "raw", server.v3("app.ova/nope.raw"), "out2.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("no member 'nope.raw' in the archive (members: app.ovf, disk1.qcow2, disk2.raw, app.mf)"), r.stderr)
        r = try Tools.ferry(["convert", "-f", "raw", "base.raw", server.v3("app.ova/new.raw")], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("a disk inside an OVA or tar archive is read-only"), r.stderr)
    }
}
