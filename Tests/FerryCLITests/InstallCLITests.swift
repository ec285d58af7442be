import Foundation
import XCTest

/// `make install`'s script puts the binary, a man page and completions in place, all made
/// from the command definitions: every subcommand and option `--help` shows is in them.
final class InstallCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("install") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func testInstallPutsBinaryManPageAndCompletionsInPlace() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let prefix = dir.appendingPathComponent("prefix").path
        let r = try Tools.run(root.appendingPathComponent("scripts/install.sh").path, [try Tools.require("ferry"), prefix], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let installed = try Tools.run(prefix + "/bin/ferry", ["--version"], in: dir)
        XCTAssertEqual(installed.status, 0)
        XCTAssertTrue(installed.stdout.hasPrefix("ferry version"), installed.stdout)

        // The man page renders, and names every subcommand and each of convert's options.
        let page = try String(contentsOfFile: prefix + "/share/man/man1/ferry.1", encoding: .utf8)
        XCTAssertTrue(page.hasPrefix(".\\\""), "a roff comment first")
        let rendered = try Tools.run("/bin/sh", ["-c", "groff -man -Tutf8 -P-cbou \"$1\"", "sh", prefix + "/share/man/man1/ferry.1"], in: dir)
        XCTAssertEqual(rendered.status, 0, rendered.stderr)
        XCTAssertFalse(rendered.stderr.contains("error"), rendered.stderr)
        let help = try Tools.ferry(["convert", "--help"], in: dir).stdout
        for sub in ["convert", "create", "info", "map"] {
            XCTAssertTrue(rendered.stdout.contains("ferry \(sub)"), "\(sub) in the page")
        }
        for long in ["--source-format", "--target-format", "--rate-limit", "--salvage", "--copy-range-offloading", "--max-in-flight"] {
            XCTAssertTrue(help.contains(long), "\(long) in --help")
            XCTAssertTrue(rendered.stdout.contains(long), "\(long) in the man page")
        }

        // bash: sourcing the script registers the completion of ferry, which knows the
        // subcommands and convert's options.
        let script = prefix + "/share/bash-completion/completions/ferry"
        let bash = try Tools.run("/bin/bash", ["-c", "source \"$1\" && complete -p ferry", "bash", script], in: dir)
        XCTAssertEqual(bash.status, 0, bash.stderr)
        XCTAssertTrue(bash.stdout.contains(" ferry"), bash.stdout)
        let text = try String(contentsOfFile: script, encoding: .utf8)
        for word in ["convert", "create", "info", "map", "--salvage", "--source-format"] {
            XCTAssertTrue(text.contains(word), "\(word) in the bash completion")
        }
        for f in ["share/zsh/site-functions/_ferry", "share/fish/vendor_completions.d/ferry.fish"] {
            let text = try String(contentsOfFile: prefix + "/" + f, encoding: .utf8)
            XCTAssertTrue(text.contains("salvage"), f)
        }
    }
}
