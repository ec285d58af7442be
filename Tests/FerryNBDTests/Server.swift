import Foundation
import XCTest
// Re-exported so every file of this target sees TestBuffer.
@_exported import FerryTestServers

/// An nbdkit run in the foreground as a child of the test, on a unix socket in `dir`.
/// `stop()` (called from tearDown) ends it whatever happened.
final class NBDServer {
    let process = Process()
    let socket: String
    let pidFile: String
    let logFile: String
    /// nbd+unix URL of the default export.
    var url: String { "nbd+unix:///?socket=\(socket)" }
    func url(export: String) -> String { "nbd+unix:///\(export)?socket=\(socket)" }

    /// nbdkit's debug messages (`-v`), when started with `debug`.
    let debugFile: String

    /// Starts `nbdkit [args]` (filters, plugin, parameters) and waits until it listens; with
    /// `debug`, its debug messages go to `debugFile`.
    init(_ args: [String], in dir: URL, name: String = "srv", debug: Bool = false) throws {
        guard let nbdkit = NBDServer.tool("nbdkit") else {
            XCTFail("nbdkit is not installed; run scripts/install-deps.sh")
            throw XCTSkip("no nbdkit")
        }
        socket = dir.appendingPathComponent("\(name).sock").path
        pidFile = dir.appendingPathComponent("\(name).pid").path
        logFile = dir.appendingPathComponent("\(name).nbdlog").path
        debugFile = dir.appendingPathComponent("\(name).debug").path
        process.executableURL = URL(fileURLWithPath: nbdkit)
        process.arguments = ["-f", "-P", pidFile, "-U", socket] + (debug ? ["-v"] : []) + args
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        var debugHandle: FileHandle?
        if debug {
            _ = FileManager.default.createFile(atPath: debugFile, contents: nil)
            debugHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: debugFile))
        }
        process.standardError = debugHandle ?? FileHandle.nullDevice
        // nbdkit has its own copy once started; ours is closed either way.
        defer { try? debugHandle?.close() }
        try process.run()
        // The pid file appears once nbdkit listens.
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            if let s = try? String(contentsOfFile: pidFile, encoding: .utf8), !s.isEmpty { return }
            if !process.isRunning { break }
            usleep(5_000)
        }
        stop()
        XCTFail("nbdkit \(args.joined(separator: " ")) did not start")
        throw XCTSkip("nbdkit did not start")
    }

    var isRunning: Bool { process.isRunning }

    /// Ends the server and waits for it to exit. SIGKILL: the clients of a test have closed
    /// their connections by now, and a child started from the test runner may inherit a
    /// signal mask that holds SIGTERM back (it then took seconds to end).
    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// The log filter's lines so far (start nbdkit with `--filter=log logfile=\(logFile)`).
    var log: String { (try? String(contentsOfFile: logFile, encoding: .utf8)) ?? "" }

    /// nbdkit's debug messages so far (started with `debug`).
    var debugOutput: String { (try? String(contentsOfFile: debugFile, encoding: .utf8)) ?? "" }

    static func tool(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }
}

/// A base class that gives each test a scratch directory and stops its servers afterwards.
class NBDTestCase: XCTestCase {
    var dir: URL!
    private var servers: [NBDServer] = []

    override func setUpWithError() throws {
        dir = URL(fileURLWithPath: "/tmp").appendingPathComponent("ferry-nbd-test-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDown() {
        for s in servers { s.stop() }
        servers = []
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func server(_ args: [String], name: String = "srv", debug: Bool = false) throws -> NBDServer {
        let s = try NBDServer(args, in: dir, name: name, debug: debug)
        servers.append(s)
        return s
    }

    /// A file of `size` bytes (sparse) in the scratch directory with `pattern` bytes written
    /// at each (offset, length).
    func makeFile(_ name: String, size: Int64, data: [(Int64, Int, UInt8)] = []) throws -> String {
        try makeSparseFile(dir.appendingPathComponent(name).path, size: size, data: data)
    }
}
