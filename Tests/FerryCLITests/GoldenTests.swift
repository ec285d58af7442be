import Foundation
import XCTest

/// Help texts and error messages compared with golden files in `golden/`.
///
/// Temporary paths are replaced by `$TMP` before comparing. After an intended change, run the
/// tests with `FERRY_UPDATE_GOLDEN=1` to rewrite the files, and review the diff.
final class GoldenTests: XCTestCase {
    static let goldenDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("golden")

    var dir: URL!

    override func setUpWithError() throws {
        dir = try makeScratchDirectory("golden")
    }

    override func tearDownWithError() throws {
        if let dir {
            _ = chmod(dir.appendingPathComponent("secret.raw").path, 0o644)
            try? FileManager.default.removeItem(at: dir)
        }
    }

    func checkGolden(_ name: String, _ actual: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let url = Self.goldenDirectory.appendingPathComponent("\(name).txt")
        if ProcessInfo.processInfo.environment["FERRY_UPDATE_GOLDEN"] == "1" {
            try FileManager.default.createDirectory(at: Self.goldenDirectory, withIntermediateDirectories: true)
            try actual.write(to: url, atomically: true, encoding: .utf8)
            return
        }
        guard let expected = try? String(contentsOf: url, encoding: .utf8) else {
            XCTFail("golden file \(url.path) is missing (FERRY_UPDATE_GOLDEN=1 writes it)", file: file, line: line)
            return
        }
        if actual != expected {
            let a = actual.split(separator: "\n", omittingEmptySubsequences: false)
            let e = expected.split(separator: "\n", omittingEmptySubsequences: false)
            var where_ = ""
            for i in 0 ..< max(a.count, e.count) {
                let al = i < a.count ? String(a[i]) : "<end>"
                let el = i < e.count ? String(e[i]) : "<end>"
                if al != el {
                    where_ = "first difference at line \(i + 1):\n  expected: \(el)\n  actual:   \(al)"
                    break
                }
            }
            XCTFail("\(name).txt differs; \(where_)\n--- actual ---\n\(actual)", file: file, line: line)
        }
    }

    func filtered(_ text: String) -> String {
        text.replacingOccurrences(of: dir.path, with: "$TMP")
    }

    // MARK: - Help

    func testHelpTexts() throws {
        let cases: [(String, [String])] = [
            ("help", ["--help"]),
            ("convert-help", ["convert", "--help"]),
            ("info-help", ["info", "--help"]),
            ("map-help", ["map", "--help"]),
        ]
        for (name, args) in cases {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 0, "ferry \(args.joined(separator: " ")) exit status")
            XCTAssertEqual(r.stderr, "", "ferry \(args.joined(separator: " ")) wrote to stderr")
            try checkGolden(name, r.stdout)
        }
        // -h is --help.
        let h = try Tools.ferry(["convert", "-h"], in: dir)
        XCTAssertEqual(h.status, 0)
        XCTAssertEqual(h.stdout, try Tools.ferry(["convert", "--help"], in: dir).stdout)
    }

    func testVersion() throws {
        let r = try Tools.ferry(["--version"], in: dir)
        XCTAssertEqual(r.status, 0)
        XCTAssertTrue(r.stdout.hasPrefix("ferry version "), r.stdout)
        XCTAssertEqual(r.stdout.filter { $0 == "\n" }.count, 1)
    }

    func testCreateOptionsHelp() throws {
        let r = try Tools.ferry(["convert", "-O", "raw", "-o", "help"], in: dir)
        XCTAssertEqual(r.status, 0)
        try checkGolden("convert-o-help", r.stdout)
    }

    // MARK: - Errors

    /// Every bad input gives one line on stderr (two for command-line mistakes: the message and
    /// a pointer to --help), nothing on stdout, exit status 1, and leaves no target behind.
    func testErrorMessages() throws {
        let t = dir.path
        try TestImage(name: "src.raw", size: 4 << 20, writes: ["write -P 0xab 0 1M", "write -P 0xcd 3M 512k"]).build(in: dir)
        try TestImage(name: "small.raw", size: 1 << 20, writes: []).build(in: dir)

        let cases: [[String]] = [
            ["convert", "\(t)/missing.raw", "\(t)/out.raw"],
            ["convert", "\(t)", "\(t)/out.raw"],
            ["convert", "-f", "foo", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-O", "foo", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-O", "qcow2", "-o", "cluster_size=3k", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-f", "raw", "\(t)/src.raw", "\(t)/no-such-dir/out.raw"],
            ["convert", "-f", "raw", "-n", "\(t)/src.raw", "\(t)/small.raw"],
            ["convert", "-f", "raw", "-n", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-m", "0", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-m", "100000", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-m", "lots", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-o", "foo=bar", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-o", "preallocation", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-f", "raw", "-o", "preallocation=sometimes", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-S", "abc", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-S", "1000", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "--buffer-size", "1000", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "--target-is-zero", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-t", "fast", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-T", "slow", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "--progress=xml", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "-c", "\(t)/src.raw", "\(t)/out.raw"],
            ["convert", "\(t)/src.raw"],
            ["convert"],
            ["info", "\(t)/missing.raw"],
            ["info", "-f", "foo", "\(t)/src.raw"],
            ["info", "--output", "xml", "\(t)/src.raw"],
            ["info"],
            ["map", "\(t)/missing.raw"],
            ["map", "-f", "foo", "\(t)/src.raw"],
            ["map", "--output=yaml", "\(t)/src.raw"],
            [],
            ["compress", "\(t)/src.raw"],
        ]

        var transcript = ""
        let ferry = try Tools.require("ferry")
        for args in cases {
            let shown = "ferry " + args.joined(separator: " ")
            let r = try Tools.run(ferry, args, in: dir)
            XCTAssertFalse(r.signalled, "\(shown) was killed by signal \(r.status)")
            XCTAssertEqual(r.status, 1, "\(shown): exit status")
            XCTAssertEqual(r.stdout, "", "\(shown): wrote to stdout")
            let lines = r.stderr.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
            XCTAssertTrue(r.stderr.hasSuffix("\n"), "\(shown): stderr does not end a line")
            XCTAssertTrue(lines.first?.hasPrefix("ferry: ") ?? false, "\(shown): \(r.stderr)")
            if lines.count == 2 {
                XCTAssertTrue(lines[1].hasPrefix("Try 'ferry"), "\(shown): second line: \(lines[1])")
            } else {
                XCTAssertEqual(lines.count, 1, "\(shown): not one line: \(r.stderr)")
            }
            XCTAssertFalse(fileExists("\(t)/out.raw"), "\(shown) left a target behind")
            transcript += "$ \(shown)\n[exit \(r.status)]\n\(r.stderr)\n"
        }
        XCTAssertEqual(fileSize("\(t)/small.raw"), 1 << 20, "a failed -n convert changed the target's size")
        try checkGolden("errors", filtered(transcript))
    }

    /// A source the user may not read. Root reads a mode-000 file anyway, so as root ferry runs
    /// as nobody (setpriv, from util-linux).
    func testUnreadableSource() throws {
        let t = dir.path
        try TestImage(name: "secret.raw", size: 1 << 20, writes: ["write -P 0x11 0 64k"]).build(in: dir)
        XCTAssertEqual(chmod("\(t)/secret.raw", 0o000), 0)
        XCTAssertEqual(chmod(t, 0o777), 0)
        let ferry = try Tools.require("ferry")
        let args = ["convert", "\(t)/secret.raw", "\(t)/out.raw"]
        let r: ProcessResult
        if getuid() == 0 {
            guard let setpriv = Tools.path(of: "setpriv") else {
                throw XCTSkip("running as root without setpriv (util-linux): cannot make a file unreadable")
            }
            // A copy of the binary in the test's directory, in case the checkout is not
            // reachable for nobody (a clone under /root).
            let copy = "\(t)/ferry"
            try FileManager.default.copyItem(atPath: ferry, toPath: copy)
            r = try Tools.run(setpriv, ["--reuid=65534", "--regid=65534", "--clear-groups", "--", copy] + args, in: dir)
            if r.status == 126 || r.status == 127 {
                throw XCTSkip("cannot run ferry as nobody here: \(r.stderr)")
            }
        } else {
            r = try Tools.run(ferry, args, in: dir)
        }
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stdout, "")
        XCTAssertFalse(fileExists("\(t)/out.raw"))
        try checkGolden("error-unreadable", filtered("$ ferry \(args.joined(separator: " "))\n[exit \(r.status)]\n\(r.stderr)"))
    }
}
