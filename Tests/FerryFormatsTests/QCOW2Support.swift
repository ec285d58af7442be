import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// Runs qemu-img and qemu-io (the oracle) and builds qcow2 images with them.
enum Oracle {
    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    static func path(of tool: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(tool)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    static func run(_ tool: String, _ args: [String], in dir: URL) throws -> Result {
        guard let exe = path(of: tool) else {
            XCTFail("\(tool) is not installed; run scripts/install-deps.sh")
            throw XCTSkip("no \(tool)")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        p.currentDirectoryURL = dir
        var env = ProcessInfo.processInfo.environment
        env["LC_ALL"] = "C"
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Result(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    /// Runs a tool and fails the test if it fails.
    @discardableResult
    static func must(_ tool: String, _ args: [String], in dir: URL, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try run(tool, args, in: dir)
        guard r.status == 0 else {
            XCTFail("\(tool) \(args.joined(separator: " ")) failed (\(r.status)): \(r.stderr)", file: file, line: line)
            throw XCTSkip("setup failed")
        }
        return r.stdout
    }

    /// `qemu-img create -f qcow2 -o options name size`, then the qemu-io commands.
    @discardableResult
    static func qcow2(_ name: String, size: String, options: String = "", writes: [String] = [], in dir: URL,
                      file: StaticString = #filePath, line: UInt = #line) throws -> String {
        var args = ["create", "-q", "-f", "qcow2"]
        if !options.isEmpty { args += ["-o", options] }
        try must("qemu-img", args + [name, size], in: dir, file: file, line: line)
        try io(name, writes, in: dir, file: file, line: line)
        return dir.appendingPathComponent(name).path
    }

    static func io(_ name: String, _ writes: [String], format: String = "qcow2", in dir: URL,
                   file: StaticString = #filePath, line: UInt = #line) throws {
        guard !writes.isEmpty else { return }
        var args = ["-f", format]
        for w in writes { args += ["-c", w] }
        try must("qemu-io", args + [name], in: dir, file: file, line: line)
    }

    /// The guest-visible bytes as qemu-img converts them.
    static func reference(_ path: String, in dir: URL) throws -> Data {
        let out = dir.appendingPathComponent("reference-\(UUID().uuidString.prefix(8)).raw").path
        try must("qemu-img", ["convert", "-O", "raw", path, out], in: dir)
        defer { try? FileManager.default.removeItem(atPath: out) }
        return try Data(contentsOf: URL(fileURLWithPath: out))
    }

    /// `qemu-img map --output=json` as a list of dictionaries.
    static func map(_ path: String, in dir: URL) throws -> [[String: Any]] {
        let text = try must("qemu-img", ["map", "--output=json", path], in: dir)
        return try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]] ?? []
    }
}

/// Writes big-endian fields into a file, to break real images in known ways.
struct Patcher {
    let path: String

    func write(_ bytes: [UInt8], at offset: Int64) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        try h.write(contentsOf: Data(bytes))
    }

    func u64(_ value: UInt64, at offset: Int64) throws {
        try write((0 ..< 8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * UInt64($0))) }, at: offset)
    }

    func u32(_ value: UInt32, at offset: Int64) throws {
        try write((0 ..< 4).map { UInt8(truncatingIfNeeded: value >> (24 - 8 * UInt32($0))) }, at: offset)
    }

    func readU64(at offset: Int64) throws -> UInt64 {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        let d = try h.read(upToCount: 8) ?? Data()
        return d.reduce(0) { $0 << 8 | UInt64($1) }
    }

    func readU32(at offset: Int64) throws -> UInt32 {
        UInt32(truncatingIfNeeded: try readU64(at: offset) >> 32)
    }

    func truncate(to size: Int64) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.truncate(atOffset: UInt64(size))
    }
}

/// Reads the whole of a device, several requests at once, as a converter would.
func readAll(_ device: any BlockDevice, chunk: Int = 1 << 20) async throws -> Data {
    let size = Int(device.size)
    let buffer = AlignedBuffer(count: max(size, 1))
    try await withThrowingTaskGroup(of: Void.self) { group in
        var pos = 0
        while pos < size {
            let start = pos, n = min(chunk, size - pos)
            group.addTask { try await device.read(at: Int64(start), into: buffer.slice(start ..< start + n)) }
            pos += n
        }
        try await group.waitForAll()
    }
    return Data(buffer.bytes[0 ..< size])
}

func scratchDirectory(_ name: String) throws -> URL {
    let base = URL(fileURLWithPath: ProcessInfo.processInfo.environment["FERRY_TEST_TMP"] ?? "/tmp")
    let dir = base.appendingPathComponent("ferry-formats-\(name)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir
}

/// Opens `path` with Ferry (probing its format) and runs `body`, closing it afterwards.
func withOpened<T>(_ path: String, format: String? = nil, options: EndpointOptions = EndpointOptions(),
                   _ body: (OpenedImage) async throws -> T) async throws -> T {
    let image = try await Images.open(ImageSpec(path, format: format), readOnly: true, options: options)
    do {
        let r = try await body(image)
        try await image.device.close()
        return r
    } catch {
        try? await image.device.close()
        throw error
    }
}
