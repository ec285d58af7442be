import Foundation
import XCTest

/// An nfs-ganesha server started by the project's scripts/nfs-start.sh on loopback ports,
/// with a read-write export (/export) and a read-only one (/export-ro).
final class NFSServer: @unchecked Sendable {
    let state: String
    let nfsPort: Int
    let mountPort: Int

    /// The repository root, from this file's place in it.
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    init(name: String, nfsPort: Int, mountPort: Int) throws {
        state = "/tmp/ferry-nfs-test-\(name)"
        self.nfsPort = nfsPort
        self.mountPort = mountPort
        try? FileManager.default.removeItem(atPath: state)
        let r = Self.script("nfs-start.sh", [state], env: ["NFS_PORT": "\(nfsPort)", "MOUNT_PORT": "\(mountPort)"])
        guard r.status == 0 else {
            throw NSError(domain: "NFSServer", code: Int(r.status), userInfo: [NSLocalizedDescriptionKey: "nfs-start.sh failed: \(r.output)"])
        }
    }

    /// Stops the server (idempotent) and removes its files.
    func stop() {
        _ = Self.script("nfs-stop.sh", [state])
        try? FileManager.default.removeItem(atPath: state)
    }

    /// The server process, for the tests that kill it.
    var pid: Int32? {
        guard let s = try? String(contentsOfFile: "\(state)/ganesha.pid", encoding: .utf8) else { return nil }
        return Int32(s.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    var exportDir: String { "\(state)/export" }
    var readOnlyDir: String { "\(state)/export-ro" }

    /// An NFSv3 URL of `file` in the read-write (or read-only) export.
    func v3(_ file: String, readOnlyExport: Bool = false) -> String {
        "nfs://127.0.0.1/\(readOnlyExport ? "export-ro" : "export")/\(file)?nfsport=\(nfsPort)&mountport=\(mountPort)"
    }

    /// An NFSv4 URL of `file` (libnfs 4.0 reads over v4 but cannot write 4 KiB or more).
    func v4(_ file: String) -> String {
        "nfs://127.0.0.1/export/\(file)?version=4&nfsport=\(nfsPort)"
    }

    /// Runs a script of the project with bash and waits for it (posix_spawn and waitpid:
    /// Foundation's Process.waitUntilExit has hung here on a child of the test runner).
    static func script(_ name: String, _ args: [String], env: [String: String] = [:]) -> (status: Int32, output: String) {
        let log = "/tmp/ferry-nfs-script-\(getpid())-\(UInt32.random(in: 0 ... .max)).log"
        defer { unlink(log) }
        var command = env.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        command += " " + ([root.appendingPathComponent("scripts/\(name)").path] + args).map { "'\($0)'" }.joined(separator: " ")
        command += " >'\(log)' 2>&1 </dev/null"
        let argv: [String] = ["/bin/bash", "-c", command]
        var cargs = argv.map { strdup($0) }
        cargs.append(nil)
        defer { for a in cargs { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, "/bin/bash", nil, nil, cargs, environ) == 0 else { return (127, "cannot spawn bash") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        let exited = status & 0x7f == 0
        return (exited ? (status >> 8) & 0xff : 128 + (status & 0x7f), output)
    }
}

/// A base class that starts one server for the whole class and stops it at the end, whatever
/// happened. Tests fail (not skip) when the server cannot start: CI must notice.
class NFSTestCase: XCTestCase {
    nonisolated(unsafe) static var shared: NFSServer?
    nonisolated(unsafe) static var startError: String?
    class var serverName: String { "device" }
    class var ports: (Int, Int) { (2061, 20061) }

    override class func setUp() {
        super.setUp()
        do {
            shared = try NFSServer(name: serverName, nfsPort: ports.0, mountPort: ports.1)
        } catch {
            startError = "\(error)"
        }
    }

    override class func tearDown() {
        shared?.stop()
        shared = nil
        super.tearDown()
    }

    var server: NFSServer!

    override func setUpWithError() throws {
        guard let s = Self.shared else {
            XCTFail("the NFS server did not start: \(Self.startError ?? "?")")
            throw XCTSkip("no NFS server")
        }
        server = s
    }

    /// A file of `size` bytes (sparse) in `dir` with `byte` written at each (offset, length).
    @discardableResult
    func makeFile(_ path: String, size: Int64, data: [(Int64, Int, UInt8)] = []) throws -> String {
        let fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0o644)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw POSIXError(.EIO) }
        for (offset, length, byte) in data {
            let bytes = [UInt8](repeating: byte, count: length)
            guard pwrite(fd, bytes, length, off_t(offset)) == length else { throw POSIXError(.EIO) }
        }
        return path
    }
}

/// A buffer the test owns.
final class TestBuffer: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer
    init(count: Int, fill: UInt8 = 0) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: fill)
    }
    deinit { bytes.deallocate() }
    var all: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }
    func slice(_ offset: Int, _ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: bytes[offset ..< offset + count])
    }
    /// A pattern that differs at every offset, so misplaced pieces show.
    func fillPattern(seed: UInt8) {
        for i in 0 ..< bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12 &+ Int(seed)) }
    }
}
