import Foundation
import XCTest

/// `ferry convert|info|map` with nbd:// and nbd+unix:// images, against real nbdkit servers
/// (and qemu-img / nbdinfo as the oracle).
final class NBDTests: XCTestCase {
    var dir: URL!
    private var servers: [Process] = []

    override func setUpWithError() throws {
        dir = try makeScratchDirectory("nbd")
    }

    override func tearDown() {
        for p in servers where p.isRunning {
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
        }
        servers = []
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    /// Starts `nbdkit -f` on a unix socket named `name` in the scratch directory and waits
    /// until it listens; returns the URL of its default export.
    /// With `tcp`, listens on a free loopback port instead and returns an nbd:// URL.
    @discardableResult
    func nbdkit(_ args: [String], name: String = "srv", tcp: Bool = false) throws -> String {
        if tcp {
            // A port nobody holds: nbdkit exits at once when the port is taken; try another.
            for _ in 0 ..< 20 {
                let port = Int.random(in: 20000 ..< 32000)
                if let url = try? startNBDKit(["-i", "127.0.0.1", "-p", "\(port)"] + args, name: name,
                                              url: "nbd://127.0.0.1:\(port)") { return url }
            }
            XCTFail("nbdkit found no free TCP port")
            throw XCTSkip("no port")
        }
        let sock = dir.appendingPathComponent("\(name).sock").path
        guard let url = try startNBDKit(["-U", sock] + args, name: name, url: "nbd+unix:///?socket=\(sock)") else {
            XCTFail("nbdkit \(args.joined(separator: " ")) did not start")
            throw XCTSkip("nbdkit did not start")
        }
        return url
    }

    /// Starts nbdkit in the foreground; returns `url` once it listens, nil if it exited.
    private func startNBDKit(_ args: [String], name: String, url: String) throws -> String? {
        let nbdkit = try Tools.require("nbdkit")
        let pid = dir.appendingPathComponent("\(name).pid").path
        try? FileManager.default.removeItem(atPath: pid)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: nbdkit)
        p.arguments = ["-f", "-P", pid] + args
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        servers.append(p)
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let s = try? String(contentsOfFile: pid, encoding: .utf8), !s.isEmpty { return url }
            if !p.isRunning { break }
            usleep(5_000)
        }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        return nil
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// A 32 MiB raw image: data runs, holes, and a run of explicit zeros.
    func sourceImage(_ name: String = "src.raw") throws -> String {
        try TestImage(name: name, size: 32 << 20, writes: [
            "write -P 0xab 0 1M", "write -P 0x5c 5M 3M", "write -z 12M 1M", "write -P 0x11 20M 64k", "write -P 0xee 31M 1M",
        ]).build(in: dir)
    }

    func compare(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", "raw", "-F", "raw", a, b], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img compare \(a) \(b): \(r.stdout)\(r.stderr)", file: file, line: line)
    }

    /// The failure line ferry printed: exactly one, naming `url`.
    func assertOneErrorLine(_ r: ProcessResult, naming url: String, containing words: [String],
                            file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertNotEqual(r.status, 0, "ferry succeeded", file: file, line: line)
        XCTAssertFalse(r.signalled, "ferry was killed by signal \(r.status)", file: file, line: line)
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty }
        XCTAssertEqual(lines.count, 1, "stderr: \(r.stderr)", file: file, line: line)
        let text = String(lines.first ?? "")
        XCTAssertTrue(text.contains(url), "'\(text)' does not name \(url)", file: file, line: line)
        for w in words { XCTAssertTrue(text.contains(w), "'\(text)' does not say '\(w)'", file: file, line: line) }
    }

    /// A copy out of an export with four connections starts deep enough to fill them all
    /// (64 requests: 16 each); with one connection, at 16. Read from the first progress line.
    func testDefaultDepthFillsEveryConnection() throws {
        let src = try sourceImage()
        let url = try nbdkit(["file", src], name: "wide")
        for (connections, depth) in [(4, 64), (1, 16)] {
            let r = try Tools.ferry(["convert", "--progress=json", "--connections", "\(connections)", "-r", "8M", "-f", "raw", "-O", "raw",
                                     url, path("wide-\(connections).raw")], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let first = r.stdout.split(separator: "\n").first.map(String.init) ?? ""
            XCTAssertTrue(first.contains("\"depth\":\(depth),"), "\(connections) connection(s): \(first)")
            try compare(src, path("wide-\(connections).raw"))
        }
    }

    /// Out of four connections (64 deep) the default reads 512 KiB at a time, so the starting
    /// depth holds 32 MiB; one connection (16 deep), --buffer-size or -m keep 1 MiB. From
    /// nbdkit's own log of the reads it served.
    func testDefaultRequestSizeFollowsTheStartingDepth() throws {
        let src = try sourceImage()
        let log = path("reads.log")
        let url = try nbdkit(["--filter=log", "file", src, "logfile=\(log)"], name: "reads")
        for (args, largest) in [([], 512 << 10), (["--connections", "1"], 1 << 20),
                                (["--buffer-size", "1M"], 1 << 20), (["-m", "64"], 1 << 20)] {
            try "".write(toFile: log, atomically: false, encoding: .utf8)
            let out = path("reads-\(args.joined()).raw")
            let r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw"] + args + [url, out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            try compare(src, out)
            XCTAssertEqual(try largestRead(in: log), largest, "\(args)")
        }
    }

    /// `ferry checksum` reads an export the same way: 512 KiB at a time over four
    /// connections, 1 MiB with -m; the digest is the local file's either way.
    func testChecksumRequestSizeFollowsTheStartingDepth() throws {
        let src = try sourceImage()
        let log = path("sum.log")
        let url = try nbdkit(["--filter=log", "file", src, "logfile=\(log)"], name: "sum")
        let local = try Tools.ferry(["checksum", "-f", "raw", src], in: dir)
        XCTAssertEqual(local.status, 0, local.stderr)
        let digest = local.stdout.split(separator: " ").first.map(String.init) ?? ""
        XCTAssertEqual(digest.count, 64, local.stdout)
        for (args, largest) in [([], 512 << 10), (["-m", "64"], 1 << 20)] {
            try "".write(toFile: log, atomically: false, encoding: .utf8)
            let r = try Tools.ferry(["checksum", "-f", "raw"] + args + [url], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.hasPrefix(digest + " "), "\(args): \(r.stdout)")
            XCTAssertEqual(try largestRead(in: log), largest, "\(args)")
        }
    }

    /// The longest read nbdkit's log filter recorded.
    func largestRead(in log: String) throws -> Int? {
        try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n")
            .filter { $0.contains("Read ") }
            .compactMap { line in line.split(separator: " ").first { $0.hasPrefix("count=") }
                .flatMap { Int($0.dropFirst("count=0x".count), radix: 16) } }
            .max()
    }

    // MARK: Round trips

    func testLocalToNBDToLocalRoundTrip() throws {
        let src = try sourceImage()
        let target = try nbdkit(["memory", "32M"], name: "mem")
        // Without -n: the export stands for the created target (its size is checked).
        var r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", src, target], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, target)
        // The export stays sparse: holes were sent as write-zeroes that may unmap.
        let map = try Tools.must("nbdinfo", ["--map", target], in: dir)
        XCTAssertTrue(map.contains("hole,zero"), map)
        // And back into a local file, which stays sparse too.
        let back = path("back.raw")
        r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", target, back], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, back)
        XCTAssertLessThan(allocatedBytes(back), 8 << 20, "the copy of a sparse export is sparse")
    }

    /// A streamOptimized VMDK written into an export larger than the image (nothing can cut
    /// it to size) reads back, by qemu-img and by Ferry: its header names the directory.
    func testStreamOptimizedVMDKIntoALargerExport() throws {
        let src = try sourceImage()
        let target = try nbdkit(["memory", "128M"], name: "mem")
        var r = try Tools.ferry(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, target], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let byQemu = path("by-qemu.raw")
        _ = try Tools.must("qemu-img", ["convert", "-f", "vmdk", "-O", "raw", target, byQemu], in: dir)
        try compare(src, byQemu)
        let byFerry = path("by-ferry.raw")
        r = try Tools.ferry(["convert", "-f", "vmdk", "-O", "raw", target, byFerry], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, byFerry)
    }

    /// Fixed VHD and VHDX written over an export that holds old data: the holes of the
    /// source are written as zeros, since the export does not read as zeros the way a new
    /// file does.
    func testFixedImagesOverOldDataWriteTheirHoles() throws {
        let src = try sourceImage()
        for (fmt, opts, fileSize) in [("vpc", "subformat=fixed,force_size=on", (32 << 20) + 512), ("vhdx", "subformat=fixed", 40 << 20)] {
            let old = path("old-\(fmt).img")
            XCTAssertTrue(FileManager.default.createFile(atPath: old, contents: Data(repeating: 0xee, count: fileSize)))
            let target = try nbdkit(["file", old], name: "old-\(fmt)")
            let r = try Tools.ferry(["convert", "-f", "raw", "-O", fmt, "-o", opts, src, target], in: dir)
            XCTAssertEqual(r.status, 0, "\(fmt): \(r.stderr)")
            let back = path("back-\(fmt).raw")
            _ = try Tools.must("qemu-img", ["convert", "-f", fmt, "-O", "raw", old, back], in: dir)
            try compare(src, back)
        }
    }

    /// libnbd (and GnuTLS, libxml2 and ICU behind it) is loaded when an nbd:// image is
    /// opened, not at every start: a local copy never reads it from disk.
    func testLibnbdIsLoadedOnlyForNBD() throws {
        let src = try sourceImage()
        var (r, libraries) = try Tools.ferryLoading(["convert", "-f", "raw", "-O", "raw", src, path("local.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(libraries.contains { $0.hasPrefix("libnbd") }, "a local copy loaded libnbd: \(libraries)")
        XCTAssertFalse(libraries.contains { $0.hasPrefix("libgnutls") }, "a local copy loaded GnuTLS: \(libraries)")
        let target = try nbdkit(["memory", "32M"], name: "mem")
        (r, libraries) = try Tools.ferryLoading(["convert", "-f", "raw", "-O", "raw", src, target], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(libraries.contains("libnbd.so.0"), "an NBD copy loads libnbd: \(libraries)")
        try compare(src, target)
    }

    /// Without a usable libnbd an NBD copy fails with one clear line naming the library and the
    /// URL, and a local copy still works. (Root only: see Tools.ferryWithout.)
    func testMissingLibnbdIsAClearError() throws {
        let src = try sourceImage()
        let url = try nbdkit(["memory", "32M"], name: "mem")
        try Tools.assertOnlyURLNeeds("libnbd.so.0", library: "libnbd", source: src, target: url, url: url,
                                     local: path("local.raw"), in: dir)
        try compare(src, path("local.raw"))
    }

    func testNBDOverTCPToNBD() throws {
        let src = try sourceImage()
        let source = try nbdkit(["-r", "file", src], name: "src", tcp: true)
        XCTAssertTrue(source.hasPrefix("nbd://127.0.0.1:"))
        let target = try nbdkit(["memory", "64M"], name: "dst")
        // A larger export is fine: the copy writes its first bytes.
        let r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", "-W", "-m", "16", source, target], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let head = path("head.raw")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "raw", target, head], in: dir)
        XCTAssertEqual(fileSize(head), 64 << 20)
        try Tools.must("truncate", ["-s", "32M", head], in: dir)
        try compare(src, head)
    }

    func testSmallMaximumRequestsAreSplitThroughDelay() throws {
        let src = try sourceImage()
        // Requests above 64 KiB are errors on this server; reads take 1 ms.
        let source = try nbdkit(["--filter=blocksize-policy", "--filter=delay", "file", src,
                                 "blocksize-maximum=64K", "blocksize-error-policy=error", "delay-read=1ms"])
        let target = try nbdkit(["--filter=blocksize-policy", "memory", "32M",
                                 "blocksize-maximum=64K", "blocksize-error-policy=error"], name: "dst")
        let out = path("out.raw")
        var r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", source, out], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, out)
        r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", "-n", src, target], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, target)
    }

    func testInfoAndMapOfAnExport() throws {
        let src = try sourceImage()
        let url = try nbdkit(["file", src])
        let info = try Tools.ferry(["info", "-f", "raw", url], in: dir)
        XCTAssertEqual(info.status, 0, info.stderr)
        XCTAssertTrue(info.stdout.contains("32 MiB"), info.stdout)
        let map = try Tools.ferry(["map", "-f", "raw", "--output=json", url], in: dir)
        XCTAssertEqual(map.status, 0, map.stderr)
        XCTAssertTrue(map.stdout.contains("\"start\": 0, \"length\": 1048576"), map.stdout)
        XCTAssertTrue(map.stdout.contains("\"data\": false"), map.stdout)
    }

    func testQcow2ServedRawOverNBD() throws {
        let src = try sourceImage()
        let qcow = path("src.qcow2")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", src, qcow], in: dir)
        let local = try Tools.ferry(["info", "-f", "qcow2", qcow], in: dir)
        guard local.status == 0 else {
            throw XCTSkip("this ferry does not read qcow2 yet (ferry info -f qcow2: \(local.stderr.trimmingCharacters(in: .whitespacesAndNewlines)))")
        }
        let url = try nbdkit(["-r", "file", qcow])
        let out = path("out.raw")
        let r = try Tools.ferry(["convert", "-f", "qcow2", "-O", "raw", url, out], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, out)
    }

    // MARK: Connections

    func connections(in log: String) -> Int {
        log.split(separator: "\n").filter { $0.contains("Connect ") }.count
    }

    func testMultiConnOpensTheRequestedConnections() throws {
        let src = try sourceImage()
        let log = path("srv.log")
        let url = try nbdkit(["--filter=log", "file", src, "logfile=\(log)"])
        var r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", url, path("a.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(connections(in: try String(contentsOfFile: log, encoding: .utf8)), 4, "the default is 4 connections")
        try "".write(toFile: log, atomically: false, encoding: .utf8)
        r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", "--connections", "2", url, path("b.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(connections(in: try String(contentsOfFile: log, encoding: .utf8)), 2)
        try compare(src, path("b.raw"))
    }

    func testOneConnectionWithoutMultiConn() throws {
        let src = try sourceImage()
        let log = path("srv.log")
        let url = try nbdkit(["--filter=multi-conn", "--filter=log", "memory", "32M", "multi-conn-mode=disable", "logfile=\(log)"])
        let r = try Tools.ferry(["convert", "-n", "-f", "raw", "-O", "raw", "--connections", "8", src, url], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(connections(in: try String(contentsOfFile: log, encoding: .utf8)), 1)
        try compare(src, url)
    }

    /// With -n the target needs nothing from the source, so it is connected while the
    /// source's handshakes are still going (here each takes 1 s: delay-open), not after them.
    func testExistingTargetOpensWhileTheSourceDoes() throws {
        let src = try sourceImage()
        let sourceLog = path("src.log"), targetLog = path("dst.log")
        let source = try nbdkit(["--filter=log", "--filter=delay", "-r", "file", src, "delay-open=1", "logfile=\(sourceLog)"], name: "src")
        let target = try nbdkit(["--filter=log", "memory", "32M", "logfile=\(targetLog)"], name: "dst")
        let r = try Tools.ferry(["convert", "-n", "-f", "raw", "-O", "raw", source, target], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, target)
        // nbdkit logs a connection once its handshake is through.
        func connectTimes(_ log: String) throws -> [Double] {
            try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { $0.contains(" Connect ") }.map { line in
                let fields = line.split(separator: " ")
                let day = fields[0].split(separator: "-").last.flatMap { Double($0) } ?? .nan
                let clock = fields[1].split(separator: ":").compactMap { Double($0) }
                return clock.count == 3 ? day * 86400 + clock[0] * 3600 + clock[1] * 60 + clock[2] : .nan
            }
        }
        let sourceDone = try XCTUnwrap(connectTimes(sourceLog).max())
        let targetFirst = try XCTUnwrap(connectTimes(targetLog).min())
        XCTAssertLessThan(targetFirst, sourceDone - 0.5, "the target was connected only once the source was open")
    }

    /// info, map and measure ask one question at a time: one connection each, not the four a
    /// copy opens to a multi-conn server (they opened four).
    func testInfoMapAndMeasureOpenOneConnection() throws {
        let src = try sourceImage()
        for command in [["info"], ["map", "--output=json"], ["measure", "-O", "qcow2"]] {
            let log = path("\(command[0]).log")
            let url = try nbdkit(["--filter=log", "-r", "file", src, "logfile=\(log)"], name: command[0])
            let r = try Tools.ferry(command + ["-f", "raw", url], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertFalse(r.stdout.isEmpty)
            let connections = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { $0.contains(" Connect ") }
            XCTAssertEqual(connections.count, 1, "ferry \(command[0]): \(connections)")
        }
        // A copy from the same kind of server still opens several.
        let log = path("convert.log")
        let url = try nbdkit(["--filter=log", "-r", "file", src, "logfile=\(log)"], name: "convert")
        let r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", url, path("copy.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { $0.contains(" Connect ") }.count, 4)
    }

    /// A source that cannot be opened leaves an existing target as it was, though the target
    /// was being opened at the same time.
    func testExistingTargetUntouchedWhenTheSourceFails() throws {
        let target = path("dst.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", target, "32M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 1M 1M", target], in: dir)
        let before = try Data(contentsOf: URL(fileURLWithPath: target))
        let missing = "nbd+unix:///?socket=\(path("nobody.sock"))"
        let r = try Tools.ferry(["convert", "-n", "-f", "raw", "-O", "qcow2", missing, target], in: dir)
        assertOneErrorLine(r, naming: missing, containing: ["connect"])
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: target)), before, "the target changed")
        try Tools.must("qemu-img", ["check", "-q", target], in: dir)
    }

    // MARK: Errors

    func testServerNotListening() throws {
        let url = "nbd+unix:///?socket=\(path("nobody.sock"))"
        var r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", url, path("out.raw")], in: dir)
        assertOneErrorLine(r, naming: url, containing: ["cannot connect"])
        XCTAssertFalse(fileExists(path("out.raw")))
        let tcp = "nbd://127.0.0.1:1/"
        r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", path("nothing.raw"), tcp], in: dir)
        XCTAssertNotEqual(r.status, 0)
        let src = try sourceImage()
        r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", src, tcp], in: dir)
        assertOneErrorLine(r, naming: tcp, containing: ["Connection refused"])
    }

    func testUnknownExportName() throws {
        let url = try nbdkit(["--filter=exportname", "memory", "8M", "exportname-strict=true", "exportname=disk"])
        let bad = url.replacingOccurrences(of: "///?", with: "///nosuch?")
        let r = try Tools.ferry(["info", "-f", "raw", bad], in: dir)
        assertOneErrorLine(r, naming: bad, containing: ["no export named 'nosuch'"])
        let good = url.replacingOccurrences(of: "///?", with: "///disk?")
        XCTAssertEqual(try Tools.ferry(["info", "-f", "raw", good], in: dir).status, 0)
    }

    func testReadErrorFromTheServer() throws {
        let src = try sourceImage()
        // noextents: every byte is read (block status would let a client skip holes).
        let url = try nbdkit(["--filter=error", "--filter=noextents", "file", src, "error=EIO", "error-pread-rate=100%"])
        let out = path("out.raw")
        let r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", url, out], in: dir)
        assertOneErrorLine(r, naming: url, containing: ["read failed: Input/output error", "offset"])
        XCTAssertFalse(fileExists(out), "a failed copy leaves no target behind")
    }

    func testWriteErrorFromTheServer() throws {
        let src = try sourceImage()
        let url = try nbdkit(["--filter=error", "memory", "32M", "error=EIO", "error-pwrite-rate=100%"])
        let r = try Tools.ferry(["convert", "-n", "-f", "raw", "-O", "raw", src, url], in: dir)
        assertOneErrorLine(r, naming: url, containing: ["write failed: Input/output error", "offset"])
    }

    func testTargetExportTooSmall() throws {
        let src = try sourceImage()
        let url = try nbdkit(["memory", "16M"])
        let r = try Tools.ferry(["convert", "-f", "raw", "-O", "raw", src, url], in: dir)
        assertOneErrorLine(r, naming: url, containing: ["too small"])
    }

    func testServerKilledMidCopy() throws {
        let src = try sourceImage()
        // All 32 MiB (noextents) in 64 KiB reads of 200 ms each, one request (split in 32
        // pieces) at a time over one connection: the copy would take seconds.
        let url = try nbdkit(["--filter=blocksize-policy", "--filter=delay", "--filter=noextents", "file", src,
                              "blocksize-maximum=64K", "delay-read=200ms"])
        let out = path("out.raw")
        let ferry = try Tools.start(try Tools.require("ferry"), ["convert", "-f", "raw", "-O", "raw", "-m", "1",
                                                                 "--connections", "1", url, out], in: dir)
        usleep(400_000)
        for p in servers { kill(p.processIdentifier, SIGKILL) }
        let r = try ferry.wait(timeout: 30)
        assertOneErrorLine(r, naming: url, containing: ["connection", "offset"])
        XCTAssertFalse(fileExists(out))
    }
}
