import Foundation
import XCTest
import FerryCore
@testable import FerryFile

/// Temp directories, mounts and loop devices for one test, undone in tearDown even when the
/// test fails.
class FileTestCase: XCTestCase {
    var dir = ""
    private var mounts: [String] = []
    private var loops: [String] = []
    private var devices: [FileDevice] = []

    override func setUpWithError() throws {
        let template = NSTemporaryDirectory() + "ferryfile.XXXXXX"
        var bytes = Array(template.utf8CString)
        guard mkdtemp(&bytes) != nil else { throw XCTSkip("mkdtemp failed") }
        dir = String(decoding: bytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    override func tearDown() async throws {
        for d in devices { try? await d.close() }
        devices.removeAll()
        for l in loops.reversed() { _ = run("/usr/sbin/losetup", "-d", l) }
        loops.removeAll()
        for m in mounts.reversed() { _ = run("/usr/bin/umount", m) }
        mounts.removeAll()
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    /// Closed in tearDown if the test did not.
    func track(_ d: FileDevice) -> FileDevice {
        devices.append(d)
        return d
    }

    func path(_ name: String) -> String { dir + "/" + name }

    /// Runs a command; its status and standard output.
    @discardableResult
    func run(_ tool: String, _ args: String...) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return (-1, "") }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Mounts a tmpfs of `size` on a new directory, or skips the test.
    func mountTmpfs(size: String) throws -> String {
        let mnt = path("tmpfs")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        guard run("/usr/bin/mount", "-t", "tmpfs", "-o", "size=\(size)", "tmpfs", mnt).status == 0 else {
            throw XCTSkip("cannot mount tmpfs (not root?)")
        }
        mounts.append(mnt)
        return mnt
    }

    /// Attaches `file` to a loop device, or skips the test.
    func attachLoop(_ file: String) throws -> String {
        let r = run("/usr/sbin/losetup", "-f", "--show", file)
        guard r.status == 0, r.output.hasPrefix("/dev/loop") else { throw XCTSkip("losetup unavailable") }
        loops.append(r.output)
        return r.output
    }

    /// Both engines, each checked to be really in use.
    let engines: [FileDevice.IOEngine] = [.uring, .threads]

    func open(_ path: String, engine: FileDevice.IOEngine, direct: Bool = false, readOnly: Bool = false,
              file: StaticString = #filePath, line: UInt = #line) async throws -> FileDevice {
        var o = FileDevice.Options(readOnly: readOnly, direct: direct, engine: engine)
        o.ringEntries = 128
        let d = track(try await FileDevice.open(path: path, options: o))
        XCTAssertEqual(d.engineInUse, engine, "engine", file: file, line: line)
        return d
    }

    func create(_ path: String, size: Int64, engine: FileDevice.IOEngine, direct: Bool = false,
                file: StaticString = #filePath, line: UInt = #line) async throws -> FileDevice {
        let d = track(try await FileDevice.create(path: path, size: size,
                                                  options: FileDevice.Options(direct: direct, engine: engine)))
        XCTAssertEqual(d.engineInUse, engine, "engine", file: file, line: line)
        return d
    }

    /// Catches the `FerryError` an async call throws; fails the test if it throws nothing or
    /// something else.
    func ferryError(file: StaticString = #filePath, line: UInt = #line,
                    _ body: () async throws -> Void) async -> FerryError? {
        do {
            try await body()
            XCTFail("expected an error", file: file, line: line)
            return nil
        } catch let e as FerryError {
            return e
        } catch {
            XCTFail("expected a FerryError, got \(error)", file: file, line: line)
            return nil
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be reproduced.
struct Pattern {
    var state: UInt64
    init(seed: UInt64) { state = seed | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
    mutating func fill(_ b: UnsafeMutableRawBufferPointer) {
        for i in 0 ..< b.count { b[i] = UInt8(truncatingIfNeeded: next() >> 24) }
    }
    mutating func bytes(_ n: Int) -> [UInt8] {
        var a = [UInt8](repeating: 0, count: n)
        a.withUnsafeMutableBytes { fill($0) }
        return a
    }
}

extension AlignedBuffer {
    convenience init(_ bytes: [UInt8]) {
        self.init(count: bytes.count)
        bytes.withUnsafeBytes { mutableBytes.copyMemory(from: $0) }
    }
    var array: [UInt8] { Array(bytes) }
}

extension BlockDevice {
    func write(_ bytes: [UInt8], at offset: Int64, flags: WriteFlags = []) async throws {
        let b = AlignedBuffer(bytes)
        try await write(at: offset, from: b.bytes, flags: flags)
    }
    func read(_ count: Int, at offset: Int64) async throws -> [UInt8] {
        let b = AlignedBuffer(count: count)
        try await read(at: offset, into: b.mutableBytes)
        return b.array
    }
}

/// The bytes of a file as the kernel has them (through the page cache).
func fileContents(_ path: String) -> [UInt8] {
    guard let d = FileManager.default.contents(atPath: path) else { return [] }
    return [UInt8](d)
}
