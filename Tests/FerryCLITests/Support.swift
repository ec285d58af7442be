import Foundation
import XCTest
import FerryTestServers

/// What a finished process left behind.
struct ProcessResult {
    var status: Int32
    var stdout: String
    var stderr: String
    /// True if the process was killed by a signal (`status` is then the signal number).
    var signalled: Bool
}

/// Runs the built `ferry` and the reference tools (qemu-img, qemu-io) as real processes.
enum Tools {
    /// The `ferry` built with the tests: it lies next to the test bundle (`FERRY_BIN` overrides).
    static let ferry: String? = {
        if let path = ProcessInfo.processInfo.environment["FERRY_BIN"] { return path }
        var dirs: [URL] = []
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            dirs.append(URL(fileURLWithPath: exe).deletingLastPathComponent())
        }
        dirs.append(Bundle.main.bundleURL)
        dirs.append(Bundle.main.bundleURL.deletingLastPathComponent())
        for bundle in Bundle.allBundles { dirs.append(bundle.bundleURL.deletingLastPathComponent()) }
        for dir in dirs {
            let candidate = dir.appendingPathComponent("ferry").path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }()

    static func path(of tool: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// Fails the test (not skips: CI must notice) when a tool is missing.
    static func require(_ tool: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        if tool == "ferry" {
            guard let f = ferry else {
                XCTFail("the ferry binary is not next to the test bundle; build it with 'swift build' first (or set FERRY_BIN)", file: file, line: line)
                throw XCTSkip("no ferry binary")
            }
            return f
        }
        guard let p = path(of: tool) else {
            XCTFail("\(tool) is not installed; run scripts/install-deps.sh", file: file, line: line)
            throw XCTSkip("no \(tool)")
        }
        return p
    }

    /// Starts `executable` with `arguments`; stdout and stderr go to files read at the end.
    static func start(_ executable: String, _ arguments: [String], in dir: URL, environment: [String: String] = [:]) throws -> RunningProcess {
        try RunningProcess(executable, arguments, dir: dir, environment: environment)
    }

    /// Runs a process to the end (with a time limit) and returns what it printed.
    @discardableResult
    static func run(_ executable: String, _ arguments: [String], in dir: URL, environment: [String: String] = [:],
                    timeout: TimeInterval = 60) throws -> ProcessResult {
        let p = try start(executable, arguments, in: dir, environment: environment)
        return try p.wait(timeout: timeout)
    }

    static func ferry(_ arguments: [String], in dir: URL, timeout: TimeInterval = 60) throws -> ProcessResult {
        try run(try require("ferry"), arguments, in: dir, timeout: timeout)
    }

    /// Runs a reference tool and fails the test if it fails.
    @discardableResult
    static func must(_ tool: String, _ arguments: [String], in dir: URL, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try run(try require(tool, file: file, line: line), arguments, in: dir)
        guard r.status == 0 && !r.signalled else {
            XCTFail("\(tool) \(arguments.joined(separator: " ")) failed (\(r.status)): \(r.stderr)", file: file, line: line)
            throw XCTSkip("setup failed")
        }
        return r.stdout
    }
}

extension Tools {
    /// The shared libraries `ferry ARGS` loaded (from ld.so's LD_DEBUG=files report), and how
    /// it ended. Libraries that only some commands need are loaded on first use.
    static func ferryLoading(_ arguments: [String], in dir: URL) throws -> (result: ProcessResult, libraries: Set<String>) {
        let r = try run(try require("ferry"), arguments, in: dir, environment: ["LD_DEBUG": "files"])
        var libraries = Set<String>()
        // "     12345:     file=libcrypto.so.3 [0];  needed by ..." or "... dynamically loaded by ..."
        for line in r.stderr.split(separator: "\n") {
            guard let start = line.range(of: "file=") else { continue }
            libraries.insert(String(line[start.upperBound...].prefix { $0 != " " && $0 != "[" }))
        }
        XCTAssertTrue(libraries.contains("libc.so.6"), "LD_DEBUG reports the libraries loaded: \(r.stderr.prefix(500))")
        return (r, libraries)
    }

    /// Runs `ferry ARGS` with the library `soname` unusable: /dev/null mounted over it in a
    /// private mount namespace. Skips unless root may do that here.
    static func ferryWithout(_ soname: String, _ arguments: [String], in dir: URL) throws -> ProcessResult {
        let ferry = try require("ferry")
        guard getuid() == 0 else { throw XCTSkip("needs root for a private mount namespace") }
        guard let lib = ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/aarch64-linux-gnu"]
            .map({ "\($0)/\(soname)" }).first(where: { FileManager.default.fileExists(atPath: $0) }) else {
            throw XCTSkip("\(soname) not found")
        }
        guard try run("/usr/bin/unshare", ["-m", "true"], in: dir).status == 0 else {
            throw XCTSkip("unshare -m is not permitted here")
        }
        let quoted = ([ferry] + arguments).map { "'" + $0 + "'" }.joined(separator: " ")
        return try run("/usr/bin/unshare", ["-m", "sh", "-c", "mount --bind /dev/null \"$(readlink -f \(lib))\" && exec \(quoted)"], in: dir)
    }

    /// With `soname` hidden (see ferryWithout), `ferry convert -f raw -O raw SOURCE TARGET` (one
    /// of them `url`, whose endpoint needs the library) fails with one line naming `library` and
    /// `url`, and a local copy of `source` to `local` still succeeds (its bytes are the caller's
    /// to compare).
    static func assertOnlyURLNeeds(_ soname: String, library: String, source: String, target: String, url: String,
                                   local: String, in dir: URL, file: StaticString = #filePath, line: UInt = #line) throws {
        var r = try ferryWithout(soname, ["convert", "-f", "raw", "-O", "raw", source, target], in: dir)
        XCTAssertNotEqual(r.status, 0, file: file, line: line)
        XCTAssertFalse(r.signalled, r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.contains(library), r.stderr, file: file, line: line)
        XCTAssertTrue(r.stderr.contains(url), r.stderr, file: file, line: line)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr, file: file, line: line)
        r = try ferryWithout(soname, ["convert", "-f", "raw", "-O", "raw", source, local], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr, file: file, line: line)
    }

    /// `nbdkit -f ARGS` on the unix socket `NAME.sock` in `dir`; returns the server (for the
    /// caller to stop) and its URL once it listens (its pid file appears then).
    static func nbdkit(_ args: [String], socket name: String, in dir: URL,
                       file: StaticString = #filePath, line: UInt = #line) throws -> (server: RunningProcess, url: String) {
        let sock = dir.appendingPathComponent("\(name).sock").path, pid = dir.appendingPathComponent("\(name).pid").path
        let server = try start(try require("nbdkit", file: file, line: line), ["-f", "-U", sock, "-P", pid] + args, in: dir)
        for _ in 0 ..< 1000 where !FileManager.default.fileExists(atPath: pid) { usleep(10_000) }
        XCTAssertTrue(FileManager.default.fileExists(atPath: pid), "nbdkit did not start", file: file, line: line)
        return (server, "nbd+unix:///?socket=\(sock)")
    }
}

/// A child process whose output is collected in files (so a test can poll stdout while it runs).
final class RunningProcess {
    let process = Process()
    let stdoutURL: URL
    let stderrURL: URL

    init(_ executable: String, _ arguments: [String], dir: URL, environment: [String: String]) throws {
        let id = UUID().uuidString
        stdoutURL = dir.appendingPathComponent(".out-\(id)")
        stderrURL = dir.appendingPathComponent(".err-\(id)")
        _ = FileManager.default.createFile(atPath: stdoutURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: stderrURL.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.currentDirectoryURL = dir
        var env = ProcessInfo.processInfo.environment
        env["COLUMNS"] = "80"
        env["LC_ALL"] = "C"
        for (k, v) in environment { env[k] = v }
        process.environment = env
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = try FileHandle(forWritingTo: stdoutURL)
        process.standardError = try FileHandle(forWritingTo: stderrURL)
        try process.run()
    }

    var pid: Int32 { process.processIdentifier }

    /// What the process has printed on stdout so far.
    var stdoutSoFar: String { (try? String(contentsOf: stdoutURL, encoding: .utf8)) ?? "" }

    func signal(_ sig: Int32) { kill(process.processIdentifier, sig) }

    func wait(timeout: TimeInterval) throws -> ProcessResult {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            process.terminate()
            usleep(200_000)
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
            XCTFail("\(process.executableURL!.lastPathComponent) \(process.arguments!.joined(separator: " ")) did not finish within \(Int(timeout)) s")
        }
        process.waitUntilExit()
        defer {
            try? FileManager.default.removeItem(at: stdoutURL)
            try? FileManager.default.removeItem(at: stderrURL)
        }
        return ProcessResult(
            status: process.terminationStatus,
            stdout: (try? String(contentsOf: stdoutURL, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOf: stderrURL, encoding: .utf8)) ?? "",
            signalled: process.terminationReason == .uncaughtSignal)
    }
}

/// A fresh directory under /tmp for one test, removed afterwards.
func makeScratchDirectory(_ name: String) throws -> URL {
    let base = URL(fileURLWithPath: ProcessInfo.processInfo.environment["FERRY_TEST_TMP"] ?? "/tmp")
    let dir = base.appendingPathComponent("ferry-cli-\(name)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    // Readable by others, for the test that runs ferry as an unprivileged user.
    chmod(dir.path, 0o755)
    return dir
}

/// A test class with one server for the whole class (see `SharedServerTestCase`) and a
/// scratch directory (`scratchName`) for each test, removed afterwards.
class ServerCLITestCase: SharedServerTestCase {
    class var scratchName: String { "server" }
    var dir: URL!

    override func setUpWithError() throws {
        try super.setUpWithError()
        dir = try makeScratchDirectory(Self.scratchName)
    }

    override func tearDownWithError() throws {
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// `qemu-img compare` says the two images are the same.
    func compare(_ a: String, _ b: String, formats: (String, String) = ("raw", "raw"), line: UInt = #line) throws {
        let r = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", formats.0, "-F", formats.1, a, b], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img compare \(a) \(b): \(r.stdout)\(r.stderr)", line: line)
    }

    /// `ferry convert ARGS` succeeds.
    func convert(_ args: [String], line: UInt = #line) throws {
        let r = try Tools.ferry(["convert"] + args, in: dir)
        XCTAssertEqual(r.status, 0, "ferry convert \(args.joined(separator: " ")): \(r.stderr)", line: line)
    }

    /// `ferry convert ARGS` fails with one line that names `url`.
    func failedConvert(_ args: [String], url: String, line: UInt = #line) throws -> ProcessResult {
        let r = try Tools.ferry(["convert"] + args, in: dir)
        XCTAssertNotEqual(r.status, 0, "ferry convert \(args.joined(separator: " ")) succeeded", line: line)
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty }
        XCTAssertEqual(lines.count, 1, "one line, not: \(r.stderr)", line: line)
        XCTAssertTrue(r.stderr.contains(url), "the message names \(url): \(r.stderr)", line: line)
        return r
    }
}

/// Bytes a file takes on disk (st_blocks x 512).
func allocatedBytes(_ path: String) -> Int64 {
    var st = stat()
    guard stat(path, &st) == 0 else { return -1 }
    return Int64(st.st_blocks) * 512
}

func fileSize(_ path: String) -> Int64 {
    var st = stat()
    guard stat(path, &st) == 0 else { return -1 }
    return Int64(st.st_size)
}

func fileExists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

/// An image built with `qemu-img create -f raw` and `qemu-io -f raw -c 'write ...'` commands.
struct TestImage {
    var name: String
    var size: Int64
    /// qemu-io commands, e.g. `write -P 0xab 0 64k`.
    var writes: [String]

    @discardableResult
    func build(in dir: URL) throws -> String {
        let path = dir.appendingPathComponent(name).path
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", path, "\(size)"], in: dir)
        if !writes.isEmpty {
            var args = ["-f", "raw"]
            for w in writes { args += ["-c", w] }
            try Tools.must("qemu-io", args + [path], in: dir)
        }
        return path
    }
}
