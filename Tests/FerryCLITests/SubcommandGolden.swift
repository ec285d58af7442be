import Foundation
import XCTest

/// Help texts of the subcommands beyond convert, info and map, compared with golden files in
/// `golden/` as `GoldenTests` compares its own (`FERRY_UPDATE_GOLDEN=1` rewrites them).
enum SubcommandGolden {
    static func checkHelp(_ subcommand: String, in dir: URL, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Tools.ferry([subcommand, "--help"], in: dir)
        XCTAssertEqual(r.status, 0, file: file, line: line)
        XCTAssertEqual(r.stderr, "", file: file, line: line)
        let url = GoldenTests.goldenDirectory.appendingPathComponent("\(subcommand)-help.txt")
        if ProcessInfo.processInfo.environment["FERRY_UPDATE_GOLDEN"] == "1" {
            try r.stdout.write(to: url, atomically: true, encoding: .utf8)
            return
        }
        let expected = try String(contentsOf: url, encoding: .utf8)
        XCTAssertEqual(r.stdout, expected, "\(subcommand) --help differs from golden/\(subcommand)-help.txt", file: file, line: line)
    }

    /// Runs the same arguments through qemu-img and ferry and checks that stdout, the exit
    /// status and (for failures) the error line match, with `qemu-img:` read as `ferry:`.
    static func sameAsQemuImg(_ args: [String], in dir: URL, file: StaticString = #filePath, line: UInt = #line) throws {
        let theirs = try Tools.run(try Tools.require("qemu-img"), args, in: dir)
        let ours = try Tools.ferry(args, in: dir)
        let what = args.joined(separator: " ")
        XCTAssertEqual(ours.stdout, theirs.stdout, "stdout of \(what)", file: file, line: line)
        XCTAssertEqual(ours.status, theirs.status, "exit status of \(what): \(ours.stderr)", file: file, line: line)
        if theirs.status != 0 {
            let expected = theirs.stderr.replacingOccurrences(of: "qemu-img:", with: "ferry:")
            XCTAssertEqual(ours.stderr, expected, "error of \(what)", file: file, line: line)
        }
    }

    /// Two copies of `image` in `dir`, `theirs-IMAGE` for qemu-img and `ours-IMAGE` for
    /// ferry (replacing earlier ones).
    static func copies(of image: String, in dir: URL) throws -> (theirs: String, ours: String) {
        let theirs = "theirs-" + image, ours = "ours-" + image
        for copy in [theirs, ours] {
            try? FileManager.default.removeItem(at: dir.appendingPathComponent(copy))
            try FileManager.default.copyItem(at: dir.appendingPathComponent(image), to: dir.appendingPathComponent(copy))
        }
        return (theirs, ours)
    }
}
