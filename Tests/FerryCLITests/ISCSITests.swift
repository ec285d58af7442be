import Foundation
import XCTest
import FerryTestServers

/// `ferry convert` with iscsi:// sources and targets against a real tgtd (and ganesha for
/// the NFS legs), judged by `qemu-img compare`; errors end in one line naming the URL
/// (without its password) and a non-zero exit. Also the delay proxy.
final class ISCSITests: ServerCLITestCase {
    static let lunSize: Int64 = 64 << 20
    override class var scratchName: String { "iscsi" }

    override class func startServer() throws -> any ScriptServer {
        try ISCSITarget(name: "cli-main", port: 3283, control: 83)
    }

    var target: ISCSITarget { shared() }

    /// 40 MiB with data, zero runs and holes (all 4 KiB aligned so both LUN block sizes fit).
    static let image = TestImage(name: "src.raw", size: 40 << 20, writes: [
        "write -P 0xab 0 64k",
        "write -P 0x11 1M 3M",
        "write -P 0x22 5242880 4096",
        "write -P 0 10M 2M",
        "write -P 0x44 20M 69632",
        "write -P 0xcd 41938944 4096",
    ])

    /// The first `size` bytes of a LUN (read back by ferry, or its backing file): a LUN is at
    /// least as large as the image, and only the image's bytes are compared.
    private func head(_ file: String, _ size: Int64 = ISCSITests.image.size) throws -> String {
        let out = path("head-\(UUID().uuidString.prefix(6)).raw")
        try Tools.must("qemu-img", ["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=\(size >> 20)", "if=\(file)", "of=\(out)"], in: dir)
        return out
    }

    /// Fills the image's part of a LUN with 0xff first, so zeros the copy forgets to write show.
    private func dirty(_ lun: String) throws {
        let junk = path("junk.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", junk, "\(Self.image.size)"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0xff 0 \(Self.image.size)", junk], in: dir)
        try convert(["-f", "raw", "-O", "raw", junk, target.url(lun)])
        try? FileManager.default.removeItem(atPath: junk)
    }

    func testRawRoundTripsThroughThinThickAnd4KnLUNs() throws {
        let src = try Self.image.build(in: dir)
        for (i, (lun, extra)) in [("thin", []), ("thick", ["-m", "16", "-W"]), ("thin4k", ["--connections", "1"])].enumerated() {
            try dirty(lun)
            try convert(extra + ["-f", "raw", "-O", "raw", src, target.url(lun)])
            // The LUN is larger than the image: compare its first bytes, read back by ferry
            // and straight from its backing file.
            let back = path("back\(i).raw")
            try convert(extra + ["-f", "raw", "-O", "raw", target.url(lun), back])
            try compare(src, try head(back))
            try compare(src, try head(target.backingFile(lun)))
            if lun != "thick" {
                // Zero runs went as WRITE SAME with UNMAP: the backing file stays sparse.
                XCTAssertLessThan(target.allocated(lun), 8 << 20, "\(lun): zero runs unmapped, not written")
            }
        }
    }

    func testQcow2SourcesToBothBlockSizes() throws {
        let raw = try Self.image.build(in: dir)
        let qcow = path("src.qcow2")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, qcow], in: dir)
        for lun in ["thin", "thin4k"] {
            try dirty(lun)
            try convert(["-f", "qcow2", "-O", "raw", qcow, target.url(lun)])
            try compare(raw, try head(target.backingFile(lun)))
            let back = path("back-\(lun).raw")
            try convert(["-f", "raw", "-O", "raw", target.url(lun), back])
            try compare(qcow, try head(back), formats: ("qcow2", "raw"))
        }
    }

    func testDashNIntoAnExistingFileAndMapOfAThinLUN() throws {
        let src = try Self.image.build(in: dir)
        try convert(["-f", "raw", "-O", "raw", src, target.url("thin")])
        // -n: read the LUN back into an existing file of its size.
        let out = path("existing.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", out, "\(Self.lunSize)"], in: dir)
        try convert(["-n", "-f", "raw", "-O", "raw", target.url("thin"), out])
        try compare(src, try head(out))
        // GET LBA STATUS: the map of the LUN shows the holes of the source as zeros.
        let r = try Tools.ferry(["map", "--output=json", "-f", "raw", target.url("thin")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("\"zero\": true"), r.stdout)
        XCTAssertTrue(r.stdout.contains("\"data\": true"), r.stdout)
    }

    func testNFSToISCSIAndBack() throws {
        let nfs = try NFSServer(name: "cli-iscsi", nfsPort: 2073, mountPort: 20073)
        defer { nfs.stop() }
        let src = try Self.image.build(in: dir)
        let onNFS = "\(nfs.exportDir)/src.raw"
        XCTAssertEqual(copyfile(src, onNFS), true)
        try convert(["-f", "raw", "-O", "raw", nfs.v3("src.raw"), target.url("thin")])
        try compare(src, try head(target.backingFile("thin")))
        try convert(["-f", "raw", "-O", "raw", target.url("thin"), nfs.v3("backup.raw")])
        try compare(src, try head("\(nfs.exportDir)/backup.raw"))
    }

    private func copyfile(_ a: String, _ b: String) -> Bool {
        (try? FileManager.default.copyItem(atPath: a, toPath: b)) != nil
    }

    // MARK: Errors: one line naming the URL, non-zero exit

    private func expectFailure(_ args: [String], url: String, mentions: [String] = [], line: UInt = #line) throws {
        let r = try failedConvert(args, url: url, line: line)
        XCTAssertFalse(r.stderr.contains(Self.badPassword) || r.stderr.contains(ISCSITarget.password), "no password: \(r.stderr)", line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "\(m) in: \(r.stderr)", line: line) }
    }

    static let badPassword = "not-the-password"

    func testLoginErrorsAndCheckConditions() throws {
        let src = try Self.image.build(in: dir)
        let down = target.url("thin", port: 3299)
        try expectFailure(["-f", "raw", "-O", "raw", src, down], url: down, mentions: ["cannot reach the iSCSI portal"])
        try expectFailure(["-f", "raw", "-O", "raw", down, path("o.raw")], url: down, mentions: ["cannot reach the iSCSI portal"])
        let unknown = target.url("nosuchtarget")
        try expectFailure(["-f", "raw", "-O", "raw", src, unknown], url: unknown, mentions: ["no target"])
        let badLUN = target.url("thin", lun: 9)
        try expectFailure(["-f", "raw", "-O", "raw", badLUN, path("o.raw")], url: badLUN, mentions: ["LUN 9", "ILLEGAL_REQUEST"])
        let wrong = "iscsi://ferry%\(Self.badPassword)@127.0.0.1:\(target.port)/\(ISCSITarget.iqn):chap/1"
        try expectFailure(["-f", "raw", "-O", "raw", src, wrong], url: "iscsi://ferry@127.0.0.1:\(target.port)/\(ISCSITarget.iqn):chap/1",
                          mentions: ["refused"])
        try expectFailure(["-f", "raw", "-O", "raw", src, target.url("chap")], url: target.url("chap"), mentions: ["refused"])
        // The right password works.
        let right = "iscsi://ferry%\(ISCSITarget.password)@127.0.0.1:\(target.port)/\(ISCSITarget.iqn):chap/1"
        try convert(["-f", "raw", "-O", "raw", src, right])
        try compare(src, try head(target.backingFile("chap")))
        // A check condition: the write-protected LUN.
        try expectFailure(["-f", "raw", "-O", "raw", src, target.url("readonly")], url: target.url("readonly"),
                          mentions: ["DATA PROTECTION", "0x27/0x00", "offset"])
        // Larger than the LUN: refused before anything is written.
        let big = path("big.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", big, "\(Self.lunSize + 4096)"], in: dir)
        let before = target.allocated("thick")
        try expectFailure(["-f", "raw", "-O", "raw", big, target.url("thick")], url: target.url("thick"), mentions: ["too small"])
        XCTAssertEqual(target.allocated("thick"), before)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("o.raw")))
    }

    // MARK: libiscsi, loaded on first use

    /// libiscsi (and the RDMA stack behind it) is loaded when an iscsi:// image is opened, not
    /// at every start.
    func testLibiscsiIsLoadedOnlyForISCSI() throws {
        let src = try Self.image.build(in: dir)
        var (r, libraries) = try Tools.ferryLoading(["convert", "-f", "raw", "-O", "raw", src, path("local.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(libraries.contains { $0.hasPrefix("libiscsi") || $0.hasPrefix("libibverbs") }, "a local copy loaded libiscsi: \(libraries)")
        (r, libraries) = try Tools.ferryLoading(["convert", "-f", "raw", "-O", "raw", src, target.url("thin")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(libraries.contains("libiscsi.so.7"), "an iSCSI copy loads libiscsi: \(libraries)")
        try compare(src, try head(target.backingFile("thin")))
    }

    /// Without a usable libiscsi an iSCSI copy fails with one line naming the library and the
    /// URL, and a local copy still works. (Root only: see Tools.ferryWithout.)
    func testMissingLibiscsiIsAClearError() throws {
        let src = try Self.image.build(in: dir)
        let url = target.url("thin")
        try Tools.assertOnlyURLNeeds("libiscsi.so.7", library: "libiscsi", source: src, target: url, url: url,
                                     local: path("local.raw"), in: dir)
        try compare(src, path("local.raw"))
    }

    // MARK: Through the delay proxy

    private func startProxy(_ args: [String]) throws -> RunningProcess {
        guard let ferry = Tools.ferry else { throw XCTSkip("no ferry binary") }
        let proxy = URL(fileURLWithPath: ferry).deletingLastPathComponent().appendingPathComponent("ferry-delay-proxy").path
        guard FileManager.default.isExecutableFile(atPath: proxy) else {
            XCTFail("ferry-delay-proxy is not next to ferry; build it with 'swift build' first")
            throw XCTSkip("no proxy")
        }
        let p = try Tools.start(proxy, args, in: dir)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline && !p.stdoutSoFar.contains("listening") { usleep(10_000) }
        XCTAssertTrue(p.stdoutSoFar.contains("listening"), "the proxy did not start")
        return p
    }

    /// Connects to 127.0.0.1:port; -1 on failure.
    private func connectTo(_ port: Int) -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = UInt16(port).bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if rc != 0 { close(fd); return -1 }
        return fd
    }

    func testDelayProxyForwardsExactlyAndAddsTheDelay() throws {
        try echoThroughProxy(delayMs: 25, proxyPort: 3384)
    }

    /// At 0 ms the proxy splices in the kernel instead of queueing: the same bytes come back.
    func testDelayProxyWithoutDelayForwardsExactly() throws {
        try echoThroughProxy(delayMs: 0, proxyPort: 3386)
    }

    /// 40 MiB sent while the reader waits a second: the proxy's queues fill and it stops
    /// reading (the sender blocks) rather than lose or reorder anything.
    func testDelayProxyHoldsBackWhileTheReaderStalls() throws {
        try echoThroughProxy(delayMs: 1, proxyPort: 3388, bytes: 40 << 20, stall: 1)
    }

    private func echoThroughProxy(delayMs: Int, proxyPort: Int, bytes count: Int = 8 << 20, stall: Double = 0) throws {
        // An echo server on loopback (a thread of this test), behind the proxy.
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var one: Int32 = 1
        setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(4))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(listener, 4)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &len) } }
        let echoPort = Int(UInt16(bigEndian: addr.sin_port))
        let echo = Thread {
            let c = accept(listener, nil, nil)
            guard c >= 0 else { return }
            var buf = [UInt8](repeating: 0, count: 1 << 16)
            while true {
                let n = buf.withUnsafeMutableBytes { read(c, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                var off = 0
                while off < n {
                    let w = buf.withUnsafeBytes { write(c, $0.baseAddress! + off, n - off) }
                    if w <= 0 { break }
                    off += w
                }
            }
            close(c)
        }
        echo.start()
        defer { close(listener) }
        let proxy = try startProxy(["\(proxyPort)", "127.0.0.1:\(echoPort)", "\(delayMs)"])
        defer { proxy.signal(SIGKILL); _ = try? proxy.wait(timeout: 5) }

        let fd = connectTo(proxyPort)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        // One byte there and back: at least 2 x the delay.
        let t0 = Date()
        var b: UInt8 = 42
        XCTAssertEqual(write(fd, &b, 1), 1)
        var r: UInt8 = 0
        XCTAssertEqual(read(fd, &r, 1), 1)
        let rtt = Date().timeIntervalSince(t0)
        XCTAssertEqual(r, 42)
        XCTAssertGreaterThanOrEqual(rtt, 2 * Double(delayMs) / 1000, "the round trip took \(rtt) s")
        XCTAssertLessThan(rtt, 1.0)
        // Random bytes come back exactly, and pipelined: far faster than one delay per chunk.
        let data = [UInt8](unsafeUninitializedCapacity: count) { buf, n in
            var g = SystemRandomNumberGenerator()
            for i in stride(from: 0, to: count, by: 8) {
                let v: UInt64 = g.next()
                withUnsafeBytes(of: v) { for j in 0 ..< 8 { buf[i + j] = $0[j] } }
            }
            n = count
        }
        let t1 = Date()
        let sender = Thread {
            var off = 0
            while off < count {
                let w = data.withUnsafeBytes { write(fd, $0.baseAddress! + off, min(1 << 16, count - off)) }
                if w <= 0 { break }
                off += w
            }
        }
        sender.start()
        if stall > 0 { Thread.sleep(forTimeInterval: stall) }
        var got = [UInt8](repeating: 0, count: count)
        var have = 0
        while have < count {
            let n = got.withUnsafeMutableBytes { read(fd, $0.baseAddress! + have, count - have) }
            if n <= 0 { break }
            have += n
        }
        XCTAssertEqual(have, count)
        XCTAssertTrue(got == data, "the proxy changed the bytes")
        XCTAssertLessThan(Date().timeIntervalSince(t1), 5.0 + stall, "bytes are delayed, not serialized")
    }

    func testTargetKilledMidCopyBehindTheProxy() throws {
        let t = try ISCSITarget(name: "cli-dying", port: 3285, control: 85, size: "256M")
        defer { t.stop() }
        // 5 ms each way makes the copy last long enough to kill the target in the middle.
        let proxy = try startProxy(["3385", "127.0.0.1:3285", "5"])
        defer { proxy.signal(SIGKILL); _ = try? proxy.wait(timeout: 5) }
        let src = path("big.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", src, "256M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 256M", src], in: dir)
        let url = t.url("thick", port: 3385)
        let p = try Tools.start(try Tools.require("ferry"), ["convert", "-f", "raw", "-O", "raw", src, url], in: dir)
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline && t.allocated("thick") < 16 << 20 { usleep(10_000) }
        if let pid = t.pid { kill(pid, SIGKILL) }
        let r = try p.wait(timeout: 60)
        XCTAssertNotEqual(r.status, 0, "the copy cannot succeed once the target is dead")
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty }
        XCTAssertEqual(lines.count, 1, "one line, not: \(r.stderr)")
        XCTAssertTrue(r.stderr.contains(url) && r.stderr.contains("offset"), r.stderr)
    }
}
