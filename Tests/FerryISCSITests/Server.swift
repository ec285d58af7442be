import Foundation
import XCTest

/// A tgtd started by the project's scripts/iscsi-start.sh on a loopback port, with its own
/// control socket: thin, thick, 4Kn, CHAP and read-only LUNs (see the script).
final class ISCSITarget: @unchecked Sendable {
    let state: String
    let port: Int
    let control: Int

    /// The repository root, from this file's place in it.
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let iqn = "iqn.2026-01.dev.ferry"
    static let password = "ferry-secret-1"

    init(name: String, port: Int, control: Int, size: String = "64M") throws {
        state = "/tmp/ferry-iscsi-test-\(name)"
        self.port = port
        self.control = control
        _ = Self.script("iscsi-stop.sh", [state])
        try? FileManager.default.removeItem(atPath: state)
        let r = Self.script("iscsi-start.sh", [state], env: ["ISCSI_PORT": "\(port)", "ISCSI_CTL": "\(control)", "ISCSI_SIZE": size])
        guard r.status == 0 else {
            throw NSError(domain: "ISCSITarget", code: Int(r.status), userInfo: [NSLocalizedDescriptionKey: "iscsi-start.sh failed: \(r.output)"])
        }
    }

    /// Stops tgtd (idempotent) and removes the backing files.
    func stop() {
        _ = Self.script("iscsi-stop.sh", [state])
        try? FileManager.default.removeItem(atPath: state)
    }

    var pid: Int32? {
        (try? String(contentsOfFile: "\(state)/tgtd.pid", encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// The URL of LUN `lun` of target `name` (thin, thick, thin4k, readonly, chap).
    func url(_ name: String, lun: Int = 1, port: Int? = nil) -> String {
        "iscsi://127.0.0.1:\(port ?? self.port)/\(Self.iqn):\(name)/\(lun)"
    }

    func chapURL(password: String = ISCSITarget.password) -> String {
        "iscsi://ferry%\(password)@127.0.0.1:\(port)/\(Self.iqn):chap/1"
    }

    func backingFile(_ name: String) -> String { "\(state)/\(name).img" }

    /// Bytes the backing file of a LUN occupies on disk.
    func allocated(_ name: String) -> Int64 {
        var st = stat()
        guard stat(backingFile(name), &st) == 0 else { return -1 }
        return Int64(st.st_blocks) * 512
    }

    /// posix_spawn and waitpid: Foundation's Process.waitUntilExit has hung on scripts that
    /// leave a daemon behind.
    static func script(_ name: String, _ args: [String], env: [String: String] = [:]) -> (status: Int32, output: String) {
        let log = "/tmp/ferry-iscsi-script-\(getpid())-\(UInt32.random(in: 0 ... .max)).log"
        defer { unlink(log) }
        var command = env.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        command += " " + ([root.appendingPathComponent("scripts/\(name)").path] + args).map { "'\($0)'" }.joined(separator: " ")
        command += " >'\(log)' 2>&1 </dev/null"
        let argv: [String] = ["/bin/bash", "-c", command]
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cargs.append(nil)
        defer { for a in cargs { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, "/bin/bash", nil, nil, cargs, environ) == 0 else { return (127, "cannot spawn bash") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return (status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f), output)
    }
}

/// A base class that starts one target for the whole class and stops it at the end, whatever
/// happened. Tests fail (not skip) when the target cannot start: CI must notice.
class ISCSITestCase: XCTestCase {
    nonisolated(unsafe) static var shared: ISCSITarget?
    nonisolated(unsafe) static var startError: String?

    override class func setUp() {
        super.setUp()
        do { shared = try ISCSITarget(name: "device", port: 3281, control: 81) } catch { startError = "\(error)" }
    }

    override class func tearDown() {
        shared?.stop()
        shared = nil
        super.tearDown()
    }

    var target: ISCSITarget!

    override func setUpWithError() throws {
        guard let t = Self.shared else {
            XCTFail("tgtd did not start: \(Self.startError ?? "?")")
            throw XCTSkip("no iSCSI target")
        }
        target = t
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
    func fillPattern(seed: UInt8) {
        for i in 0 ..< bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12 &+ Int(seed)) }
    }
}
