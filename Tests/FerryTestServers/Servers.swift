import Foundation

// Test servers the test targets share: each started and stopped by the project's own scripts.

/// The project's scripts, run with bash.
public enum ProjectScripts {
    /// The repository root, from this file's place in it.
    public static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Runs scripts/NAME with ARGS and waits for it (posix_spawn and waitpid: Foundation's
    /// Process.waitUntilExit has hung here on scripts that leave a daemon behind).
    public static func run(_ name: String, _ args: [String], env: [String: String] = [:]) -> (status: Int32, output: String) {
        let log = "/tmp/ferry-script-\(getpid())-\(UInt32.random(in: 0 ... .max)).log"
        defer { unlink(log) }
        var command = env.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        command += " " + ([root.appendingPathComponent("scripts/\(name)").path] + args).map { "'\($0)'" }.joined(separator: " ")
        command += " >'\(log)' 2>&1 </dev/null"
        guard let status = bash(command) else { return (127, "cannot spawn bash") }
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return (status, output)
    }

    /// Runs a shell command line and waits for it; true if it succeeded.
    public static func runCommand(_ line: String) -> Bool {
        bash(line + " >/dev/null 2>&1 </dev/null") == 0
    }

    /// `bash -c LINE`, waited for: its exit status (128 + N for signal N), nil if it could not
    /// start.
    private static func bash(_ line: String) -> Int32? {
        let argv: [String] = ["/bin/bash", "-c", line]
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) }
        cargs.append(nil)
        defer { for a in cargs { free(a) } }
        var pid: pid_t = 0
        guard posix_spawn(&pid, "/bin/bash", nil, nil, cargs, environ) == 0 else { return nil }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }

    /// Starts a server with scripts/NAME-start.sh STATE (its state directory, emptied first,
    /// after NAME-stop.sh STATE when `stopFirst`); throws with the script's output if it fails.
    static func startServer(_ name: String, state: String, env: [String: String], stopFirst: Bool = false) throws {
        if stopFirst { _ = run("\(name)-stop.sh", [state]) }
        try? FileManager.default.removeItem(atPath: state)
        let r = run("\(name)-start.sh", [state], env: env)
        guard r.status == 0 else {
            throw NSError(domain: name, code: Int(r.status), userInfo: [NSLocalizedDescriptionKey: "\(name)-start.sh failed: \(r.output)"])
        }
    }

    /// Stops a server with scripts/NAME-stop.sh STATE and removes its state directory.
    static func stopServer(_ name: String, state: String) {
        _ = run("\(name)-stop.sh", [state])
        try? FileManager.default.removeItem(atPath: state)
    }

    /// The pid a server wrote to FILE.
    static func pid(in file: String) -> Int32? {
        (try? String(contentsOfFile: file, encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }
}

/// An nfs-ganesha server started by the project's scripts/nfs-start.sh on loopback ports,
/// with a read-write export (/export) and a read-only one (/export-ro).
public final class NFSServer: ScriptServer, @unchecked Sendable {
    public let state: String
    public let nfsPort: Int
    public let mountPort: Int


    public init(name: String, nfsPort: Int, mountPort: Int) throws {
        state = "/tmp/ferry-nfs-test-\(name)"
        self.nfsPort = nfsPort
        self.mountPort = mountPort
        try ProjectScripts.startServer("nfs", state: state, env: ["NFS_PORT": "\(nfsPort)", "MOUNT_PORT": "\(mountPort)"])
    }

    public func stop() { ProjectScripts.stopServer("nfs", state: state) }

    /// The server process, for the tests that kill it.
    public var pid: Int32? { ProjectScripts.pid(in: "\(state)/ganesha.pid") }

    public var exportDir: String { "\(state)/export" }
    public var readOnlyDir: String { "\(state)/export-ro" }

    /// An NFSv3 URL of `file` in the read-write (or read-only) export.
    public func v3(_ file: String, readOnlyExport: Bool = false) -> String {
        "nfs://127.0.0.1/\(readOnlyExport ? "export-ro" : "export")/\(file)?nfsport=\(nfsPort)&mountport=\(mountPort)"
    }

    /// An NFSv4 URL of `file` (libnfs 4.0 reads over v4 but cannot write 4 KiB or more).
    public func v4(_ file: String) -> String {
        "nfs://127.0.0.1/export/\(file)?version=4&nfsport=\(nfsPort)"
    }

}

/// A tgtd started by the project's scripts/iscsi-start.sh on a loopback port, with its own
/// control socket: thin, thick, 4Kn, CHAP and read-only LUNs (see the script).
public final class ISCSITarget: ScriptServer, @unchecked Sendable {
    public let state: String
    public let port: Int
    public let control: Int

    public static let iqn = "iqn.2026-01.dev.ferry"
    public static let password = "ferry-secret-1"

    public init(name: String, port: Int, control: Int, size: String = "64M") throws {
        state = "/tmp/ferry-iscsi-test-\(name)"
        self.port = port
        self.control = control
        try ProjectScripts.startServer("iscsi", state: state, env: ["ISCSI_PORT": "\(port)", "ISCSI_CTL": "\(control)", "ISCSI_SIZE": size],
                                       stopFirst: true)
    }

    public func stop() { ProjectScripts.stopServer("iscsi", state: state) }

    /// The target process, for the tests that kill it.
    public var pid: Int32? { ProjectScripts.pid(in: "\(state)/tgtd.pid") }

    /// The URL of LUN `lun` of target `name` (thin, thick, thin4k, readonly, chap).
    public func url(_ name: String, lun: Int = 1, port: Int? = nil) -> String {
        "iscsi://127.0.0.1:\(port ?? self.port)/\(Self.iqn):\(name)/\(lun)"
    }

    public func chapURL(password: String = ISCSITarget.password) -> String {
        "iscsi://ferry%\(password)@127.0.0.1:\(port)/\(Self.iqn):chap/1"
    }

    public func backingFile(_ name: String) -> String { "\(state)/\(name).img" }

    /// Bytes the backing file of a LUN occupies on disk.
    public func allocated(_ name: String) -> Int64 {
        var st = stat()
        guard stat(backingFile(name), &st) == 0 else { return -1 }
        return Int64(st.st_blocks) * 512
    }

}

/// A one-node Ceph cluster started by the project's scripts/ceph-start.sh on loopback ports
/// below the ephemeral range: one monitor, one manager, one bluestore OSD, and the pool
/// `rbdpool` for RBD images. About 15 s to start, so a test run starts it once.
public final class CephCluster: ScriptServer, @unchecked Sendable {
    public let state: String
    public static let pool = "rbdpool"

    public init(name: String, monPort: Int = 19300) throws {
        state = "/tmp/ferry-ceph-test-\(name)"
        // The cluster's other ports follow monPort (see the script).
        try ProjectScripts.startServer("ceph", state: state, env: ["CEPH_MON_PORT": "\(monPort)"], stopFirst: true)
    }

    public func stop() { ProjectScripts.stopServer("ceph", state: state) }

    public var conf: String { "\(state)/ceph.conf" }

    /// The OSD's process, for the tests that stop it.
    public var osdPid: Int32? { ProjectScripts.pid(in: "\(state)/run/osd.0.pid") }

    /// Starts the OSD again (after a test killed it); it daemonizes and takes its data back.
    public func startOSD() -> Bool {
        ProjectScripts.runCommand("ceph-osd -c '\(conf)' -i 0")
    }

    /// qemu's name of IMAGE (`POOL/IMAGE`, `POOL/NS/IMAGE`, with `@SNAP`) in this cluster.
    public func url(_ image: String) -> String { "rbd:\(image):conf=\(conf)" }
}
