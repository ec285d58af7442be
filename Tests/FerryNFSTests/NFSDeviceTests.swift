import FerryConvert
import FerryCore
import FerryNFS
import Foundation
import XCTest
import FerryTestServers

/// The NFS endpoint against a real nfs-ganesha (started once for the class).
final class NFSDeviceTests: NFSTestCase {
    func testCreateIsSparseSizedAndZeroInit() async throws {
        let url = server.v3("created.raw")
        let d = try await NFSDevice.create(url, size: 1 << 30)
        XCTAssertEqual(d.size, 1 << 30)
        XCTAssertEqual(d.name, url)
        XCTAssertTrue(d.capabilities.isSuperset(of: [.write, .flush, .zeroInit]))
        XCTAssertTrue(d.capabilities.isDisjoint(with: [.zero, .fastZero, .discard, .extents]),
                      "libnfs 4.0 has no ALLOCATE/DEALLOCATE or SEEK: no such capability")
        XCTAssertEqual(d.limits.preferredTransfer, 1 << 20, "libnfs 4.0 caps READ and WRITE at 1 MiB")
        XCTAssertEqual(d.limits.maximumTransfer, 32 << 20, "larger writes are split into pieces")
        let extents = try await d.extents(in: 4096 ..< 8192)
        XCTAssertEqual(extents, [Extent(offset: 4096, length: (1 << 30) - 4096, kind: .data)])
        try await d.close()
        var st = stat()
        XCTAssertEqual(stat("\(server.exportDir)/created.raw", &st), 0)
        XCTAssertEqual(st.st_size, 1 << 30)
        XCTAssertLessThan(st.st_blocks, 1024, "the new file is sparse")
    }

    func testCreateTruncatesAnExistingFile() async throws {
        try makeFile("\(server.exportDir)/old.raw", size: 8 << 20, data: [(0, 1 << 20, 0x77)])
        let d = try await NFSDevice.create(server.v3("old.raw"), size: 2 << 20)
        XCTAssertEqual(d.size, 2 << 20)
        let b = TestBuffer(count: 4096, fill: 1)
        try await d.read(at: 0, into: b.bytes)
        XCTAssertTrue(b.bytes.allSatisfy { $0 == 0 }, "the old contents are gone")
        try await d.close()
    }

    func testWriteThenReadBackConcurrentlyOverV3AndV4() async throws {
        let chunk = 192 << 10   // not a divisor of 1 MiB: pieces straddle the split points
        let count = 48
        let url = server.v3("rw.raw")
        let d = try await NFSDevice.create(url, size: Int64(chunk * count) + 12345)
        let source = TestBuffer(count: chunk * count)
        source.fillPattern(seed: 3)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< count {
                let piece = UnsafeRawBufferPointer(source.slice(i * chunk, chunk))
                nonisolated(unsafe) let p = piece
                g.addTask { try await d.write(at: Int64(i * chunk), from: p, flags: []) }
            }
            try await g.waitForAll()
        }
        // One write larger than the server's maximum, at an odd offset: split by the device.
        let big = TestBuffer(count: (3 << 20) + 777)
        big.fillPattern(seed: 9)
        try await d.write(at: 1001, from: big.all, flags: [])
        XCTAssertLessThanOrEqual(d.largestTransfer, 1 << 20)
        try await d.flush()
        try await d.close()

        // What the server's file holds, byte for byte.
        memcpy(source.bytes.baseAddress! + 1001, big.bytes.baseAddress!, big.bytes.count)
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: "\(server.exportDir)/rw.raw"))
        XCTAssertEqual(onDisk.count, chunk * count + 12345)
        XCTAssertTrue(onDisk.prefix(chunk * count).elementsEqual(UnsafeRawBufferPointer(source.bytes)))
        XCTAssertTrue(onDisk.suffix(12345).allSatisfy { $0 == 0 })

        for url in [server.v3("rw.raw"), server.v4("rw.raw")] {
            let r = try await NFSDevice.open(url, readOnly: true)
            XCTAssertFalse(r.capabilities.contains(.write))
            let back = TestBuffer(count: chunk * count)
            try await withThrowingTaskGroup(of: Void.self) { g in
                for i in 0 ..< count {
                    nonisolated(unsafe) let p = back.slice(i * chunk, chunk)
                    g.addTask { try await r.read(at: Int64(i * chunk), into: p) }
                }
                try await g.waitForAll()
            }
            XCTAssertEqual(memcmp(source.bytes.baseAddress!, back.bytes.baseAddress!, chunk * count), 0, url)
            // A read larger than the maximum is split too.
            let whole = TestBuffer(count: chunk * count)
            try await r.read(at: 0, into: whole.bytes)
            XCTAssertEqual(memcmp(source.bytes.baseAddress!, whole.bytes.baseAddress!, chunk * count), 0, url)
            XCTAssertLessThanOrEqual(r.largestTransfer, 1 << 20)
            try await r.close()
        }
    }

    func testManyRequestsReallyInFlightOnOneConnection() async throws {
        let size = 32 << 20
        try makeFile("\(server.exportDir)/pipe.raw", size: Int64(size), data: [(0, size, 0x5a)])
        let d = try await NFSDevice.open(server.v3("pipe.raw"), readOnly: true, connections: 1)
        XCTAssertEqual(d.connectionCount, 1)
        XCTAssertEqual(d.limits.maximumTransfer, 1 << 20, "read from, the device keeps to rsize: one READ per request")
        let chunk = 64 << 10
        let buffer = TestBuffer(count: size)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< size / chunk {
                nonisolated(unsafe) let p = buffer.slice(i * chunk, chunk)
                g.addTask { try await d.read(at: Int64(i * chunk), into: p) }
            }
            try await g.waitForAll()
        }
        XCTAssertTrue(buffer.bytes.allSatisfy { $0 == 0x5a })
        XCTAssertGreaterThanOrEqual(d.peakInFlight, 16, "512 concurrent reads on one session were not pipelined (peak \(d.peakInFlight))")
        try await d.close()
    }

    /// The copy engine hands a request larger than wsize to the device in one call, which sends
    /// its pieces together: one worker has them all in flight, not one per round trip.
    func testOneRequestOfSeveralPiecesIsSentTogether() async throws {
        let size = 8 << 20
        let src = MemoryDevice(size: Int64(size))
        var pattern = [UInt8](repeating: 0, count: size)
        for i in pattern.indices { pattern[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12) }
        try await src.write(at: 0, from: pattern.withUnsafeBytes { $0 }, flags: [])
        let d = try await NFSDevice.create(server.v3("pieces.raw"), size: Int64(size), connections: 1)
        var c = CopyConfiguration()
        c.workers = 1
        c.bufferSize = 4 << 20
        _ = try await CopyEngine.copy(from: src, to: d, configuration: c)
        XCTAssertGreaterThanOrEqual(d.peakInFlight, 2, "4 MiB requests in \(d.limits.preferredTransfer)-byte pieces, one at a time")
        let back = TestBuffer(count: size)
        try await d.read(at: 0, into: back.bytes)
        XCTAssertTrue(back.bytes.elementsEqual(pattern), "the copy reads back")
        try await d.close()
    }

    func testSeveralConnectionsShareTheLoad() async throws {
        let url = server.v3("multi.raw")
        let d = try await NFSDevice.create(url, size: 16 << 20, connections: 3)
        XCTAssertEqual(d.connectionCount, 3)
        let data = TestBuffer(count: 16 << 20)
        data.fillPattern(seed: 5)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< 16 {
                nonisolated(unsafe) let p = UnsafeRawBufferPointer(data.slice(i << 20, 1 << 20))
                g.addTask { try await d.write(at: Int64(i << 20), from: p, flags: []) }
            }
            try await g.waitForAll()
        }
        try await d.flush()
        try await d.close()
        // Several NFSv4 sessions from one process need their own client names.
        let r = try await NFSDevice.open(server.v4("multi.raw"), readOnly: true, connections: 3)
        XCTAssertEqual(r.connectionCount, 3)
        let back = TestBuffer(count: 16 << 20)
        try await r.read(at: 0, into: back.bytes)
        XCTAssertEqual(memcmp(data.bytes.baseAddress!, back.bytes.baseAddress!, 16 << 20), 0)
        try await r.close()
    }

    func testWriteZeroesWritesZerosAndRefusesFastOnly() async throws {
        try makeFile("\(server.exportDir)/z.raw", size: 6 << 20, data: [(0, 6 << 20, 0xee)])
        let d = try await NFSDevice.open(server.v3("z.raw"), readOnly: false)
        XCTAssertFalse(d.capabilities.contains(.zeroInit), "an existing file is not known to read as zeros")
        do {
            try await d.writeZeroes(at: 0, length: 4096, flags: [.fastOnly])
            XCTFail("fastOnly zeroing must be refused")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .notSupported)
        }
        try await d.writeZeroes(at: 100, length: (5 << 20) - 200, flags: [.mayUnmap])
        try await d.discard(at: 0, length: 4096)   // ignored
        try await d.flush()
        try await d.close()
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: "\(server.exportDir)/z.raw"))
        XCTAssertTrue(onDisk.prefix(100).allSatisfy { $0 == 0xee })
        XCTAssertTrue(onDisk[100 ..< (5 << 20) - 100].allSatisfy { $0 == 0 })
        XCTAssertTrue(onDisk.suffix(from: (5 << 20) - 100).allSatisfy { $0 == 0xee })
    }

    func testReadOnlyDeviceRefusesWrites() async throws {
        try makeFile("\(server.exportDir)/ro.raw", size: 1 << 20)
        let d = try await NFSDevice.open(server.v3("ro.raw"), readOnly: true)
        let b = TestBuffer(count: 4096)
        do {
            try await d.write(at: 0, from: b.all, flags: [])
            XCTFail("write on a read-only device")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .readOnly)
        }
        try await d.close()
    }

    func testFileShrunkUnderTheReaderIsAShortRead() async throws {
        let path = try makeFile("\(server.exportDir)/shrink.raw", size: 4 << 20, data: [(0, 4 << 20, 1)])
        let url = server.v3("shrink.raw")
        let d = try await NFSDevice.open(url, readOnly: true)
        XCTAssertEqual(truncate(path, 1 << 20), 0)
        let b = TestBuffer(count: 2 << 20)
        do {
            try await d.read(at: 2 << 20, into: b.bytes)
            XCTFail("reading past the new end must fail")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .shortRead)
            XCTAssertEqual(e.path, url)
            XCTAssertNotNil(e.offset)
        }
        try await d.close()
    }

    // MARK: Errors

    private func expectOpenError(_ url: String, create: Bool = false, readOnly: Bool = true,
                                 _ check: (FerryError) -> Void, line: UInt = #line) async {
        do {
            let d = create ? try await NFSDevice.create(url, size: 1 << 20)
                           : try await NFSDevice.open(url, readOnly: readOnly)
            try? await d.close()
            XCTFail("opening \(url) should fail", line: line)
        } catch let e as FerryError {
            XCTAssertEqual(e.path, url, line: line)
            XCTAssertFalse(e.description.contains("\n"), "one line: \(e)", line: line)
            check(e)
        } catch {
            XCTFail("not a FerryError: \(error)", line: line)
        }
    }

    func testServerNotListening() async throws {
        await expectOpenError("nfs://127.0.0.1/export/a.raw?nfsport=2999&mountport=29999") { e in
            XCTAssertTrue(e.description.contains("cannot reach the NFS server"), e.description)
        }
        await expectOpenError("nfs://127.0.0.1/export/a.raw?version=4&nfsport=2999") { e in
            XCTAssertEqual(e.code, .io)
        }
    }

    func testMissingExportAndFile() async throws {
        await expectOpenError("nfs://127.0.0.1/no-such-export/a.raw?nfsport=\(server.nfsPort)&mountport=\(server.mountPort)") { e in
            XCTAssertTrue(e.description.contains("cannot mount"), e.description)
        }
        await expectOpenError("nfs://127.0.0.1/no-such-export/a.raw?version=4&nfsport=\(server.nfsPort)") { e in
            XCTAssertEqual(e.code, .notFound, e.description)
        }
        await expectOpenError(server.v3("no-such-file.raw")) { e in
            XCTAssertEqual(e.code, .notFound, e.description)
        }
        await expectOpenError(server.v4("no-such-file.raw")) { e in
            XCTAssertEqual(e.code, .notFound, e.description)
        }
        await expectOpenError("nfs://127.0.0.1/") { e in
            XCTAssertEqual(e.code, .invalidArgument, e.description)
        }
    }

    func testReadOnlyExportAsTarget() async throws {
        try makeFile("\(server.readOnlyDir)/there.raw", size: 1 << 20)
        await expectOpenError(server.v3("new.raw", readOnlyExport: true), create: true) { e in
            XCTAssertEqual(e.code, .readOnly, e.description)
        }
        await expectOpenError(server.v3("there.raw", readOnlyExport: true), readOnly: false) { e in
            XCTAssertTrue([.readOnly, .permissionDenied].contains(e.code), e.description)
        }
        // Reading it is fine.
        let d = try await NFSDevice.open(server.v3("there.raw", readOnlyExport: true), readOnly: true)
        XCTAssertEqual(d.size, 1 << 20)
        try await d.close()
    }

    func testPermissionDeniedForAnotherUser() async throws {
        let path = try makeFile("\(server.exportDir)/private.raw", size: 1 << 20)
        chmod(path, 0o600)
        await expectOpenError(server.v3("private.raw") + "&uid=1000&gid=1000") { e in
            XCTAssertEqual(e.code, .permissionDenied, e.description)
        }
    }
}

/// A server of its own, killed while requests are in flight.
final class NFSServerDeathTests: XCTestCase {
    func testServerKilledMidWrite() async throws {
        let s = try NFSServer(name: "death", nfsPort: 2062, mountPort: 20062)
        defer { s.stop() }
        let url = s.v3("dying.raw")
        let d = try await NFSDevice.create(url, size: 1 << 30)
        let buffer = TestBuffer(count: 1 << 20, fill: 0x42)
        nonisolated(unsafe) let b = buffer.all
        let writes = Task {
            try await withThrowingTaskGroup(of: Void.self) { g in
                for i in 0 ..< 1024 {
                    g.addTask { try await d.write(at: Int64(i) << 20, from: b, flags: []) }
                }
                try await g.waitForAll()
            }
        }
        try await Task.sleep(nanoseconds: 150_000_000)
        if let pid = s.pid { kill(pid, SIGKILL) }
        do {
            try await writes.value
            try await d.flush()
            XCTFail("the copy cannot succeed once the server is dead")
        } catch let e as FerryError {
            XCTAssertEqual(e.path, url)
            XCTAssertEqual(e.code, .io, e.description)
            XCTAssertFalse(e.description.contains("\n"))
        }
        // Later calls fail at once instead of hanging, and close returns.
        do {
            try await d.write(at: 0, from: b, flags: [])
            XCTFail("a write after the server died")
        } catch {}
        try await d.close()
    }
}
