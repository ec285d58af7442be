import Foundation
import XCTest
import FerryTestServers

/// `ferry convert` with nfs:// sources and targets against a real ganesha, judged by
/// `qemu-img compare`; errors end in one line naming the URL and a non-zero exit.
final class NFSTests: ServerCLITestCase {
    override class var scratchName: String { "nfs" }

    override class func startServer() throws -> any ScriptServer {
        try NFSServer(name: "cli-main", nfsPort: 2071, mountPort: 20071)
    }

    var server: NFSServer { shared() }

    static let image = TestImage(name: "src.raw", size: (24 << 20) + 1536, writes: [
        "write -P 0xab 0 64k",
        "write -P 0x11 1M 3M",
        "write -P 0x22 5243392 3584",
        "write -P 0 10M 2M",
        "write -P 0x44 20M 66048",
        "write -P 0xcd 25165824 1536",
    ])

    func testRawRoundTripWritingOverV3ReadingOverV3AndV4() throws {
        let src = try Self.image.build(in: dir)
        for (i, extra) in [[], ["-m", "16", "-W"], ["--connections", "3"]].enumerated() {
            let name = "rt\(i).raw"
            try convert(extra + ["-f", "raw", "-O", "raw", src, server.v3(name)])
            try compare(src, "\(server.exportDir)/\(name)")
            var st = stat()
            XCTAssertEqual(stat("\(server.exportDir)/\(name)", &st), 0)
            XCTAssertEqual(Int64(st.st_size), Self.image.size)
            XCTAssertLessThan(Int64(st.st_blocks) * 512, 8 << 20, "the holes of the source stay holes on the server")
            try convert(extra + ["-f", "raw", "-O", "raw", server.v3(name), path("back3-\(i).raw")])
            try compare(src, path("back3-\(i).raw"))
            try convert(extra + ["-f", "raw", "-O", "raw", server.v4(name), path("back4-\(i).raw")])
            try compare(src, path("back4-\(i).raw"))
        }
    }

    func testQcow2OnNFSReadsLikeLocalQcow2() throws {
        let local = path("local.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", local, "32M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5e 0 1M", "-c", "write -P 0x61 7M 300k",
                                   "-c", "write -z 9M 1M", "-c", "write -P 0x3c 31M 1M", local], in: dir)
        let info = try Tools.ferry(["info", "-f", "qcow2", local], in: dir)
        guard info.status == 0 else {
            throw XCTSkip("this ferry cannot read qcow2 yet (the qcow2 reader has not landed): \(info.stderr)")
        }
        // The qcow2 file itself goes to the server as bytes, through ferry.
        try convert(["-f", "raw", "-O", "raw", local, server.v3("img.qcow2")])
        try compare(local, "\(server.exportDir)/img.qcow2", formats: ("raw", "raw"))
        for url in [server.v3("img.qcow2"), server.v4("img.qcow2")] {
            let out = path("from-nfs.raw")
            try convert(["-f", "qcow2", "-O", "raw", url, out])
            try compare(local, out, formats: ("qcow2", "raw"))
            try? FileManager.default.removeItem(atPath: out)
            let i = try Tools.ferry(["info", url], in: dir)
            XCTAssertEqual(i.status, 0, i.stderr)
            XCTAssertTrue(i.stdout.contains("file format: qcow2"), i.stdout)
        }
    }

    /// A qcow2 written straight to the server: clean, identical, and its file cut to what
    /// the image uses (not left at the upper bound it was created with).
    func testQcow2WrittenToNFSIsCleanAndCutToSize() throws {
        let src = try Self.image.build(in: dir)
        for (name, extra) in [("plain.qcow2", [String]()), ("packed.qcow2", ["-c"])] {
            try convert(extra + ["-f", "raw", "-O", "qcow2", src, server.v3(name)])
            let file = "\(server.exportDir)/\(name)"
            let check = try Tools.run(try Tools.require("qemu-img"), ["check", "--output=json", file], in: dir)
            XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
            try compare(src, file, formats: ("raw", "qcow2"))
            let report = try JSONSerialization.jsonObject(with: Data(check.stdout.utf8)) as? [String: Any]
            let end = try XCTUnwrap(report?["image-end-offset"] as? Int, check.stdout)
            var st = stat()
            XCTAssertEqual(stat(file, &st), 0)
            XCTAssertEqual(Int(st.st_size), end, "\(name): the file ends where the image does")
        }
    }

    /// libnfs copies each WRITE into a buffer of its own; ferry keeps glibc from giving those
    /// back to the kernel and faulting them in again (about 21k page faults for 512 MiB
    /// written as qcow2, 10k with the fix, whatever the size). At a fixed depth (-m 8): the
    /// default's depth grows where it pays, and every request in flight holds its own
    /// libnfs copy, faulted in once.
    func testWritingToNFSDoesNotFaultInEveryBuffer() throws {
        let src = path("512m.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", src, "512M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 512M", src], in: dir)
        var before = rusage(), after = rusage()
        getrusage(RUSAGE_CHILDREN.rawValue, &before)
        try convert(["-m", "8", "-f", "raw", "-O", "qcow2", src, server.v3("faults.qcow2")])
        getrusage(RUSAGE_CHILDREN.rawValue, &after)
        let faults = after.ru_minflt - before.ru_minflt
        XCTAssertGreaterThan(faults, 0, "the child's page faults are counted")
        XCTAssertLessThan(faults, 15_000, "page faults writing 512 MiB to NFS")
        try compare(src, "\(server.exportDir)/faults.qcow2", formats: ("raw", "qcow2"))
    }

    func testDashNWritesIntoAnExistingFile() throws {
        let src = try Self.image.build(in: dir)
        // An existing file full of 0xff: -n must overwrite every byte, zeros included.
        let target = "\(server.exportDir)/existing.raw"
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", target, "\(Self.image.size)"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0xff 0 \(Self.image.size)", target], in: dir)
        try convert(["-n", "-f", "raw", "-O", "raw", src, server.v3("existing.raw")])
        try compare(src, target)
    }

    // MARK: Errors: one line naming the URL, non-zero exit

    private func expectFailure(_ args: [String], url: String, mentions: String? = nil, line: UInt = #line) throws {
        let r = try failedConvert(args, url: url, line: line)
        if let mentions { XCTAssertTrue(r.stderr.contains(mentions), "\(mentions) in: \(r.stderr)", line: line) }
    }

    func testServerDownMissingExportAndMissingFile() throws {
        let src = try Self.image.build(in: dir)
        let down = "nfs://127.0.0.1/export/x.raw?nfsport=2999&mountport=29999"
        try expectFailure(["-f", "raw", "-O", "raw", down, path("o.raw")], url: down, mentions: "cannot reach the NFS server")
        try expectFailure(["-f", "raw", "-O", "raw", src, down], url: down, mentions: "cannot reach the NFS server")
        let noExport = "nfs://127.0.0.1/nothing/x.raw?nfsport=\(server.nfsPort)&mountport=\(server.mountPort)"
        try expectFailure(["-f", "raw", "-O", "raw", noExport, path("o.raw")], url: noExport, mentions: "cannot mount")
        try expectFailure(["-f", "raw", "-O", "raw", server.v3("missing.raw"), path("o.raw")], url: server.v3("missing.raw"))
        try expectFailure(["-f", "raw", "-O", "raw", server.v4("missing.raw"), path("o.raw")], url: server.v4("missing.raw"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("o.raw")))
    }

    func testReadOnlyExportAsTarget() throws {
        let src = try Self.image.build(in: dir)
        let url = server.v3("new.raw", readOnlyExport: true)
        try expectFailure(["-f", "raw", "-O", "raw", src, url], url: url, mentions: "read-only")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "\(server.readOnlyDir)/there.raw", "\(Self.image.size)"], in: dir)
        let there = server.v3("there.raw", readOnlyExport: true)
        try expectFailure(["-n", "-f", "raw", "-O", "raw", src, there], url: there)
    }

    func testServerKilledMidCopy() throws {
        let s = try NFSServer(name: "cli-death", nfsPort: 2072, mountPort: 20072)
        defer { s.stop() }
        let src = path("big.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", src, "1G"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1G", src], in: dir)
        let url = s.v3("dying.raw")
        let p = try Tools.start(try Tools.require("ferry"), ["convert", "-f", "raw", "-O", "raw", src, url], in: dir)
        // Kill the server once data is flowing.
        let deadline = Date().addingTimeInterval(20)
        var st = stat()
        while Date() < deadline {
            if stat("\(s.exportDir)/dying.raw", &st) == 0 && st.st_blocks > 16 << 11 { break }
            usleep(10_000)
        }
        if let pid = s.pid { kill(pid, SIGKILL) }
        let r = try p.wait(timeout: 60)
        XCTAssertNotEqual(r.status, 0, "the copy cannot succeed once the server is dead")
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty }
        XCTAssertEqual(lines.count, 1, "one line, not: \(r.stderr)")
        XCTAssertTrue(r.stderr.contains(url) && r.stderr.contains("offset"), r.stderr)
    }
}
