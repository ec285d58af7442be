import Foundation
import XCTest

/// `ferry compare` against `qemu-img compare`: the same lines on stdout and the same exit
/// status on crafted pairs, any format and endpoint, and holes that cost nothing.
final class CompareCLITests: XCTestCase {
    var dir: URL!
    /// nbdkit servers to stop in tearDown.
    var servers: [RunningProcess] = []

    override func setUpWithError() throws { dir = try makeScratchDirectory("compare") }
    override func tearDownWithError() throws {
        for server in servers {
            server.signal(SIGTERM)
            _ = try? server.wait(timeout: 10)
        }
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Writes `bytes` at `offset` of an existing file.
    func poke(_ name: String, at offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forWritingTo: dir.appendingPathComponent(name))
        try h.seek(toOffset: offset)
        try h.write(contentsOf: Data(bytes))
        try h.close()
    }

    func sparse(_ name: String, _ size: UInt64) throws {
        _ = FileManager.default.createFile(atPath: path(name), contents: nil)
        let h = try FileHandle(forWritingTo: dir.appendingPathComponent(name))
        try h.truncate(atOffset: size)
        try h.close()
    }

    /// The crafted pairs of the README's table: sizes both ways, content, the tail past the
    /// smaller image, allocation with -s, qcow2 zero clusters and unallocated clusters.
    func craft() throws {
        try sparse("a.raw", 1 << 20)
        try sparse("b.raw", 2 << 20)
        try sparse("bt.raw", 2 << 20)
        try poke("bt.raw", at: 1_500_000, [0x78])
        try sparse("c.raw", 1 << 20)
        try poke("c.raw", at: 70000, [0x79])
        try FileManager.default.copyItem(atPath: path("c.raw"), toPath: path("c2.raw"))
        try FileManager.default.copyItem(atPath: path("c.raw"), toPath: path("d.raw"))
        try poke("d.raw", at: 70001, [0x71])
        try sparse("z.raw", 1 << 20)
        try poke("z.raw", at: 0, [UInt8](repeating: 0, count: 1 << 20))
        try sparse("odd.raw", 1000)
        try sparse("odd2.raw", 1500)
        try poke("odd2.raw", at: 1200, [0x7a])
        for name in ["q1.qcow2", "q2.qcow2", "q4.qcow2"] {
            try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", name, "1M"], in: dir)
        }
        try Tools.must("qemu-io", ["-c", "write -P 0 0 64k", "-c", "write -P 7 300000 1000", "q2.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -z 0 64k", "q4.qcow2"], in: dir)
    }

    static let cases: [[String]] = [
        ["a.raw", "b.raw"], ["b.raw", "a.raw"], ["-s", "a.raw", "b.raw"], ["-s", "b.raw", "a.raw"],
        ["a.raw", "bt.raw"], ["bt.raw", "a.raw"], ["a.raw", "c.raw"], ["-q", "a.raw", "c.raw"],
        ["-s", "a.raw", "c.raw"], ["-s", "c.raw", "c2.raw"], ["-s", "c.raw", "d.raw"], ["c.raw", "d.raw"],
        ["-s", "a.raw", "z.raw"], ["a.raw", "z.raw"], ["q1.qcow2", "q2.qcow2"], ["q2.qcow2", "q1.qcow2"],
        ["-s", "q1.qcow2", "q2.qcow2"], ["-s", "q4.qcow2", "q1.qcow2"], ["-s", "a.raw", "q1.qcow2"],
        ["a.raw", "q1.qcow2"], ["odd.raw", "odd2.raw"], ["a.raw", "a.raw"], ["-s", "q2.qcow2", "q2.qcow2"],
        ["-f", "raw", "-F", "qcow2", "a.raw", "q2.qcow2"], ["-q", "a.raw", "a.raw"],
        // Errors: status 2.
        ["a.raw", "missing.raw"], ["-f", "qcow2", "a.raw", "c.raw"],
    ]

    func testMessagesAndStatusMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        try craft()
        for args in Self.cases {
            let theirs = try Tools.run(qemu, ["compare"] + args, in: dir)
            let ours = try Tools.ferry(["compare"] + args, in: dir)
            let what = "compare \(args.joined(separator: " "))"
            XCTAssertEqual(ours.stdout, theirs.stdout, what)
            XCTAssertEqual(ours.status, theirs.status, "\(what): \(ours.stderr)")
            if theirs.status == 2 {
                XCTAssertEqual(ours.stderr.split(separator: "\n").count, 1, "\(what): one error line: \(ours.stderr)")
            }
        }
        // A usage mistake is status 1, as qemu-img's.
        let usage = try Tools.ferry(["compare", "a.raw"], in: dir)
        XCTAssertEqual(usage.status, 1)
        XCTAssertTrue(usage.stderr.contains("expecting two image names"), usage.stderr)
    }

    func testJSONOutput() throws {
        try craft()
        var r = try Tools.ferry(["compare", "--output", "json", "c.raw", "d.raw"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stdout, """
        {
            "identical": false,
            "result": "content-mismatch",
            "offset": 69632,
            "size-mismatch": false,
            "size1": 1048576,
            "size2": 1048576
        }

        """)
        r = try Tools.ferry(["compare", "--output=json", "a.raw", "b.raw"], in: dir)
        XCTAssertEqual(r.status, 0)
        let object = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        XCTAssertEqual(object?["identical"] as? Bool, true)
        XCTAssertEqual(object?["result"] as? String, "identical")
        XCTAssertEqual(object?["size-mismatch"] as? Bool, true)
        XCTAssertNil(object?["offset"])
        r = try Tools.ferry(["compare", "--output=json", "-s", "q4.qcow2", "q1.qcow2"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stdout.contains("\"result\": \"block-status-mismatch\""), r.stdout)
    }

    /// A local qcow2 against its copy served by nbdkit, and against a changed copy.
    func testLocalQcow2AgainstNBDExport() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "src.qcow2", "64M"], in: dir)
        try Tools.must("qemu-io", ["-c", "write -P 0x33 1M 3M", "-c", "write -P 0x44 40M 5M", "-c", "write -z 50M 1M", "src.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "raw", "src.qcow2", "copy.raw"], in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "raw", "src.qcow2", "changed.raw"], in: dir)
        try poke("changed.raw", at: (42 << 20) + 777, [0x00])
        let same = try serve("copy.raw"), changed = try serve("changed.raw")
        var r = try Tools.ferry(["compare", "src.qcow2", same], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "Images are identical.\n")
        r = try Tools.ferry(["compare", "-F", "raw", "src.qcow2", changed], in: dir)
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertEqual(r.stdout, "Content mismatch at offset \((42 << 20) + 512)!\n")
        let theirs = try Tools.run(try Tools.require("qemu-img"), ["compare", "-F", "raw", "src.qcow2", "changed.raw"], in: dir)
        XCTAssertEqual(theirs.stdout, r.stdout)
    }

    /// nbdkit serving `name` read-only on a unix socket; returns its URL.
    func serve(_ name: String) throws -> String {
        let (server, url) = try Tools.nbdkit(["-r", "file", path(name)], socket: name, in: dir)
        servers.append(server)
        return url
    }

    /// Two 4 TiB sparse images with a little data: compared in far less time than reading
    /// them would take.
    func testHolesCostNothing() throws {
        try sparse("big1.raw", 4 << 40)
        try sparse("big2.raw", 4 << 40)
        for name in ["big1.raw", "big2.raw"] {
            try poke(name, at: 3 << 40, [UInt8](repeating: 0x5c, count: 1 << 20))
        }
        let start = Date()
        var r = try Tools.ferry(["compare", "big1.raw", "big2.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stdout, "Images are identical.\n")
        XCTAssertLessThan(Date().timeIntervalSince(start), 20)
        try poke("big2.raw", at: (3 << 40) + 4096, [0x01])
        r = try Tools.ferry(["compare", "-s", "big1.raw", "big2.raw"], in: dir)
        XCTAssertEqual(r.stdout, "Content mismatch at offset \((3 << 40) + 4096)!\n")
    }

    func testHelpMatchesGolden() throws {
        let r = try Tools.ferry(["compare", "--help"], in: dir)
        XCTAssertEqual(r.status, 0)
        try checkHelpGolden("compare-help", r.stdout)
    }
}

/// Compares a subcommand's help with `golden/NAME.txt` (`FERRY_UPDATE_GOLDEN=1` rewrites it).
func checkHelpGolden(_ name: String, _ actual: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let url = GoldenTests.goldenDirectory.appendingPathComponent("\(name).txt")
    if ProcessInfo.processInfo.environment["FERRY_UPDATE_GOLDEN"] == "1" {
        try actual.write(to: url, atomically: true, encoding: .utf8)
        return
    }
    let expected = try String(contentsOf: url, encoding: .utf8)
    XCTAssertEqual(actual, expected, "\(name).txt differs (FERRY_UPDATE_GOLDEN=1 rewrites it)", file: file, line: line)
}
