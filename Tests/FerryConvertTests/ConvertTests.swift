import XCTest
import FerryCore
import FerryFile
import FerryFormats
@testable import FerryConvert

/// `convert` and the engine over real local files.
final class ConvertTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "ferry-convert-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func makeFile(_ name: String, size: Int, fill: (Int) -> UInt8) throws -> String {
        let path = dir + "/" + name
        let bytes = (0 ..< size).map(fill)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        return path
    }

    /// One iSCSI session to read, four to write, unless --connections says otherwise; NFS and
    /// NBD take four either way.
    func testSessionsPerEndpointByDefaultAndWhenGiven() {
        var o = ConvertOptions()
        XCTAssertEqual(Images.iscsiConnections(o.sourceEndpoint, reading: true), 1)
        XCTAssertEqual(Images.iscsiConnections(o.targetEndpoint, reading: false), 4)
        XCTAssertEqual(Images.nfsConnections(o.sourceEndpoint), 4)
        XCTAssertEqual(Images.nfsConnections(o.targetEndpoint), 4)
        o.connections = 3
        XCTAssertEqual(Images.iscsiConnections(o.sourceEndpoint, reading: true), 3)
        XCTAssertEqual(Images.iscsiConnections(o.targetEndpoint, reading: false), 3)
        XCTAssertEqual(Images.nfsConnections(o.sourceEndpoint), 3)
        o.connections = 0
        XCTAssertThrowsError(try o.validate())
    }

    /// Local targets written through the page cache and flushed at the end start write-back as
    /// they go; unflushed, direct and synchronous targets, and sources, leave it to the kernel.
    func testOnlyFlushedBufferedTargetsWriteBehind() async throws {
        for cache in CacheMode.allCases {
            var o = ConvertOptions()
            o.targetCache = cache
            o.sourceCache = cache
            let path = dir + "/behind-\(cache).raw"
            let c = try await Images.createEndpoint(path, size: 1 << 20, options: o.targetEndpoint)
            let created = try XCTUnwrap(c as? FileDevice)
            let expected = cache == .writeback ? EndpointOptions.writeBehind : 0
            XCTAssertEqual(created.writeBehind, expected, "created, \(cache)")
            try await created.close()
            let r = try await Images.openEndpoint(path, readOnly: false, options: o.targetEndpoint)
            let reopened = try XCTUnwrap(r as? FileDevice)
            XCTAssertEqual(reopened.writeBehind, expected, "existing target (-n), \(cache)")
            try await reopened.close()
            let s = try await Images.openEndpoint(path, readOnly: true, options: o.sourceEndpoint)
            let source = try XCTUnwrap(s as? FileDevice)
            XCTAssertEqual(source.writeBehind, 0, "source, \(cache)")
            try await source.close()
        }
        XCTAssertGreaterThan(EndpointOptions.writeBehind, 0)
    }

    func testSourceShorterThanItClaimsIsAnErrorWithImageAndOffset() async throws {
        let path = try makeFile("src.raw", size: 1 << 20) { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let source = try await FileDevice.open(path: path, options: .init(readOnly: true))
        // The file shrinks after it was opened: reads past the new end must not pass for zeros.
        XCTAssertEqual(truncate(path, 300_000), 0)
        let target = MemoryDevice(name: "dst", size: source.size)
        var config = CopyConfiguration()
        config.bufferSize = 65536
        do {
            _ = try await CopyEngine.copy(from: source, to: target, configuration: config)
            XCTFail("a short source must fail the copy")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .shortRead)
            XCTAssertEqual(e.path, path)
            let at = try XCTUnwrap(e.offset)
            XCTAssertGreaterThanOrEqual(at, 300_000 - 65536)
            XCTAssertLessThanOrEqual(at, 1 << 20)
            XCTAssertTrue(e.description.hasPrefix("\(path): "), e.description)
        }
        try await source.close()
    }

    func testTargetSameAsSourceIsRefusedBeforeAnythingIsTouched() async throws {
        let path = try makeFile("disk.raw", size: 65536) { _ in 0xAA }
        do {
            _ = try await convert(sources: [ImageSpec(path, format: "raw")], target: ImageSpec(path), options: ConvertOptions())
            XCTFail("converting a file onto itself must be refused")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .invalidArgument)
            XCTAssertTrue(e.message.contains("same file"), e.message)
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data(repeating: 0xAA, count: 65536))
    }

    func testExistingLargerTargetKeepsItsTail() async throws {
        let src = try makeFile("src.raw", size: 100_000) { UInt8(truncatingIfNeeded: $0 % 251) }
        let dst = try makeFile("dst.raw", size: 300_000) { _ in 0x55 }
        var options = ConvertOptions()
        options.useExistingTarget = true
        let stats = try await convert(sources: [ImageSpec(src, format: "raw")], target: ImageSpec(dst), options: options)
        XCTAssertEqual(stats.virtualSize, 100_000)
        let out = try Data(contentsOf: URL(fileURLWithPath: dst))
        XCTAssertEqual(out.count, 300_000)
        XCTAssertEqual(out.prefix(100_000), try Data(contentsOf: URL(fileURLWithPath: src)))
        XCTAssertEqual(out.suffix(200_000), Data(repeating: 0x55, count: 200_000))
    }

    func testEveryEngineAndCacheModeCopiesExactly() async throws {
        // Odd size: the O_DIRECT tail goes through the buffered descriptor.
        let src = try makeFile("src.raw", size: 3 * 65536 + 777) { $0 % 3 == 0 ? 0 : UInt8(truncatingIfNeeded: $0 >> 4) }
        let expected = try Data(contentsOf: URL(fileURLWithPath: src))
        for engine in [FileDevice.IOEngine.uring, .threads] {
            for cache in CacheMode.allCases {
                var options = ConvertOptions()
                options.fileEngine = engine
                options.targetCache = cache
                options.sourceCache = cache
                options.bufferSize = 65536
                let dst = dir + "/out-\(engine)-\(cache).raw"
                _ = try await convert(sources: [ImageSpec(src, format: "raw")], target: ImageSpec(dst), options: options)
                XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dst)), expected, "\(engine) \(cache)")
            }
        }
    }
}

/// A device that counts the extent queries it answers.
final class ExtentCountingDevice: BlockDevice, @unchecked Sendable {
    let inner: MemoryDevice
    let queries = Locked(0)
    init(_ inner: MemoryDevice) { self.inner = inner }
    var name: String { inner.name }
    var size: Int64 { inner.size }
    var limits: BlockLimits { inner.limits }
    var capabilities: BlockCapabilities { inner.capabilities }
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws { try await inner.read(at: offset, into: buffer) }
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws { try await inner.write(at: offset, from: buffer, flags: flags) }
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws { try await inner.writeZeroes(at: offset, length: length, flags: flags) }
    func discard(at offset: Int64, length: Int64) async throws { try await inner.discard(at: offset, length: length) }
    func extents(in range: Range<Int64>) async throws -> [Extent] {
        queries.withLock { $0 += 1 }
        return try await inner.extents(in: range)
    }
    func flush() async throws {}
    func close() async throws {}
}

final class MapTests: XCTestCase {
    /// `map` of a fragmented raw file asks for its extents a batch at a time, not once per
    /// extent for the whole rest of the file (that took 2.3 s for 2,346 extents).
    func testMapWalksARawFileInBatches() async throws {
        let memory = MemoryDevice(name: "frag.raw", size: 8 << 20)
        for k in stride(from: 0, to: 8 << 20, by: 8192) {
            try await memory.write(at: Int64(k), bytes: [UInt8](repeating: 1, count: 4096))
        }
        let device = ExtentCountingDevice(memory)
        let entries = try await Images.mapEntries(device, isRaw: true)
        XCTAssertEqual(entries.count, 2048, "one entry per data run and per hole")
        XCTAssertEqual(entries.filter(\.data).count, 1024)
        XCTAssertEqual(entries.last.map { $0.start + $0.length }, 8 << 20)
        XCTAssertLessThanOrEqual(device.queries.withLock { $0 }, 4, "extents asked once per batch")
    }
}

/// Libraries of the endpoints a command line names start loading before anything opens.
final class PreloadTests: XCTestCase {
    func testTheLibrariesOfTheNamedEndpointsLoadOnceInTheBackground() async throws {
        XCTAssertEqual(Images.preloadLibraries(for: ["convert", "-O", "qcow2", "/tmp/a.raw", "b.qcow2", "nfs://h/e/f"]), [],
                       "files and NFS (linked, not loaded) start nothing")
        let line = ["convert", "-f", "raw", "nbd+unix:///?socket=/tmp/s.sock", "iscsi://127.0.0.1/iqn.x:y/1", "nbd://h/e"]
        XCTAssertEqual(Images.preloadLibraries(for: line), ["NBD", "iSCSI"], "one load each, in the order named")
        XCTAssertEqual(Images.preloadLibraries(for: line), [], "once per process")
        // The loading thread maps libnbd (a test before may have loaded it already).
        let deadline = Date().addingTimeInterval(10)
        var mapped = false
        while !mapped && Date() < deadline {
            mapped = Self.maps().contains("libnbd.so")
            if !mapped { try await Task.sleep(nanoseconds: 10_000_000) }
        }
        XCTAssertTrue(mapped, "libnbd was not loaded")
    }

    /// /proc/self/maps (read in a loop: procfs gives its files no size).
    private static func maps() -> String {
        let fd = open("/proc/self/maps", O_RDONLY)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            out += chunk[0 ..< n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}
