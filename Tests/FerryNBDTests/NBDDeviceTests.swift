import FerryConvert
import FerryCore
import FerryNBD
import Foundation
import XCTest

/// The NBD endpoint against real nbdkit servers.
final class NBDDeviceTests: NBDTestCase {
    func testOpenReportsSizeLimitsAndCapabilities() async throws {
        let s = try server(["memory", "16M"])
        let d = try await NBDDevice.open(s.url, readOnly: false)
        XCTAssertEqual(d.size, 16 << 20)
        XCTAssertEqual(d.name, s.url)
        XCTAssertTrue(d.capabilities.isSuperset(of: [.write, .zero, .fastZero, .discard, .extents, .flush, .fua, .multiConn]))
        XCTAssertFalse(d.capabilities.contains(.zeroInit), "NBD cannot tell an export reads as zeros")
        XCTAssertEqual(d.limits.alignment, 1)
        XCTAssertEqual(d.limits.maximumTransfer, NBDDevice.defaultMaximum, "no maximum advertised: 32 MiB")
        XCTAssertEqual(d.serverLimits.maximumTransfer, NBDDevice.defaultMaximum)
        XCTAssertEqual(d.connectionCount, 4)
        try await d.close()
    }

    func testBlockSizesFromTheServer() async throws {
        let s = try server(["--filter=blocksize-policy", "memory", "16M",
                            "blocksize-minimum=512", "blocksize-preferred=64K", "blocksize-maximum=256K"])
        let d = try await NBDDevice.open(s.url, readOnly: true)
        XCTAssertEqual(d.serverLimits, BlockLimits(alignment: 512, preferredTransfer: 64 << 10, maximumTransfer: 256 << 10))
        // Larger requests are split inside the device, so callers may send up to 32 MiB.
        XCTAssertEqual(d.limits, BlockLimits(alignment: 512, preferredTransfer: 64 << 10, maximumTransfer: 32 << 20))
        XCTAssertFalse(d.capabilities.contains(.write))
        try await d.close()
    }

    func testWriteThenReadBackConcurrently() async throws {
        let s = try server(["memory", "64M"])
        let d = try await NBDDevice.open(s.url, readOnly: false, connections: 4)
        let chunk = 256 << 10
        let count = 64
        let source = TestBuffer(count: chunk * count)
        for i in 0 ..< count { source.bytes[(i * chunk) ..< ((i + 1) * chunk)].initializeMemory(as: UInt8.self, repeating: UInt8(i + 1)) }
        let src = UInt(bitPattern: source.bytes.baseAddress)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< count {
                g.addTask {
                    let p = UnsafeRawPointer(bitPattern: src)! + i * chunk
                    try await d.write(at: Int64(i * chunk), from: UnsafeRawBufferPointer(start: p, count: chunk), flags: [])
                }
            }
            try await g.waitForAll()
        }
        try await d.flush()
        let back = TestBuffer(count: chunk * count)
        let dst = UInt(bitPattern: back.bytes.baseAddress)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< count {
                g.addTask {
                    let p = UnsafeMutableRawPointer(bitPattern: dst)! + i * chunk
                    try await d.read(at: Int64(i * chunk), into: UnsafeMutableRawBufferPointer(start: p, count: chunk))
                }
            }
            try await g.waitForAll()
        }
        XCTAssertTrue(memcmp(source.bytes.baseAddress!, back.bytes.baseAddress!, chunk * count) == 0)
        // One request larger than everything else, unaligned, at an odd offset.
        let odd = TestBuffer(count: 3 << 20, fill: 0x5a)
        try await d.write(at: 12345, from: odd.all, flags: [.fua])
        let oddBack = TestBuffer(count: 3 << 20)
        try await d.read(at: 12345, into: oddBack.bytes)
        XCTAssertTrue(oddBack.allEqual(0x5a))
        try await d.close()
    }

    func testRequestsAboveTheServerMaximumAreSplit() async throws {
        // The policy filter rejects any request above 64 KiB: only split requests succeed.
        let s = try server(["--filter=blocksize-policy", "memory", "8M",
                            "blocksize-maximum=64K", "blocksize-error-policy=error"])
        let d = try await NBDDevice.open(s.url, readOnly: false)
        XCTAssertEqual(d.serverLimits.maximumTransfer, 64 << 10)
        let b = TestBuffer(count: 1 << 20, fill: 0xc3)
        try await d.write(at: 4096, from: b.all, flags: [])
        let r = TestBuffer(count: 1 << 20)
        try await d.read(at: 4096, into: r.bytes)
        XCTAssertTrue(r.allEqual(0xc3))
        XCTAssertEqual(d.largestCommand, 64 << 10)
        try await d.close()
    }

    func testExtentsOfASparseFile() async throws {
        let path = try makeFile("sparse.raw", size: 16 << 20, data: [(0, 1 << 20, 0xab), (8 << 20, 64 << 10, 0xcd)])
        let s = try server(["file", path])
        let d = try await NBDDevice.open(s.url, readOnly: true)
        XCTAssertTrue(d.capabilities.contains(.extents))
        var all: [Extent] = []
        try await d.forEachExtent(in: 0 ..< d.size) { all.append($0) }
        XCTAssertEqual(all.coalesced(), [
            Extent(offset: 0, length: 1 << 20, kind: .data),
            Extent(offset: 1 << 20, length: 7 << 20, kind: .zero),
            Extent(offset: 8 << 20, length: 64 << 10, kind: .data),
            Extent(offset: (8 << 20) + (64 << 10), length: (8 << 20) - (64 << 10), kind: .zero),
        ])
        // From an offset inside an extent, and a range shorter than the extent.
        let part = try await d.extents(in: (1 << 20) + 4096 ..< (2 << 20))
        XCTAssertEqual(part.first?.offset, (1 << 20) + 4096)
        XCTAssertEqual(part.first?.kind, .zero)
        try await d.close()
    }

    func testWithoutBlockStatusEverythingIsData() async throws {
        let path = try makeFile("sparse.raw", size: 4 << 20)
        let s = try server(["--filter=noextents", "file", path])
        let d = try await NBDDevice.open(s.url, readOnly: true)
        let e = try await d.extents(in: 0 ..< d.size)
        XCTAssertEqual(e, [Extent(offset: 0, length: 4 << 20, kind: .data)])
        try await d.close()
    }

    func testZeroesAndTrim() async throws {
        let s = try server(["memory", "8M"])
        let d = try await NBDDevice.open(s.url, readOnly: false)
        let b = TestBuffer(count: 8 << 20, fill: 0xee)
        try await d.write(at: 0, from: b.all, flags: [])
        try await d.writeZeroes(at: 1 << 20, length: 1 << 20, flags: [])
        try await d.writeZeroes(at: 3 << 20, length: 1 << 20, flags: [.mayUnmap, .fastOnly])
        try await d.discard(at: 6 << 20, length: 1 << 20)
        let r = TestBuffer(count: 1 << 20, fill: 1)
        try await d.read(at: 1 << 20, into: r.bytes)
        XCTAssertTrue(r.allEqual(0))
        try await d.read(at: 3 << 20, into: r.bytes)
        XCTAssertTrue(r.allEqual(0))
        try await d.read(at: 2 << 20, into: r.bytes)
        XCTAssertTrue(r.allEqual(0xee))
        let e = try await d.extents(in: 3 << 20 ..< 4 << 20)
        XCTAssertEqual(e.first?.kind, .zero)
        try await d.close()
    }

    func testServerWithoutZeroWritesZerosAndRefusesFastOnly() async throws {
        let s = try server(["--filter=nozero", "--filter=log", "memory", "8M", "logfile=\(dir.path)/srv.nbdlog"])
        let d = try await NBDDevice.open(s.url, readOnly: false)
        XCTAssertFalse(d.capabilities.contains(.zero))
        XCTAssertFalse(d.capabilities.contains(.fastZero))
        let b = TestBuffer(count: 4 << 20, fill: 0x77)
        try await d.write(at: 0, from: b.all, flags: [])
        do {
            try await d.writeZeroes(at: 0, length: 1 << 20, flags: [.fastOnly])
            XCTFail("fastOnly on a server without fast zero must fail")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .notSupported)
        }
        let r = TestBuffer(count: 4 << 20, fill: 1)
        try await d.read(at: 0, into: r.bytes)
        XCTAssertTrue(r.allEqual(0x77), "a refused fast zero leaves the range alone")
        try await d.writeZeroes(at: 0, length: 3 << 20, flags: [])
        try await d.read(at: 0, into: r.bytes)
        XCTAssertTrue(r.bytes[0 ..< (3 << 20)].allSatisfy { $0 == 0 })
        XCTAssertTrue(r.bytes[(3 << 20)...].allSatisfy { $0 == 0x77 })
        try await d.close()
        XCTAssertFalse(s.log.contains("Zero "), "no NBD zero command was sent")
    }

    func testMultiConnOpensSeveralConnectionsAndSpreadsRequests() async throws {
        let s = try server(["--filter=log", "memory", "32M", "logfile=\(dir.path)/srv.nbdlog"])
        let d = try await NBDDevice.open(s.url, readOnly: false, connections: 3)
        XCTAssertEqual(d.connectionCount, 3)
        let chunk = 64 << 10
        let b = TestBuffer(count: 32 << 20, fill: 9)
        let base = UInt(bitPattern: b.bytes.baseAddress)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< 512 {
                g.addTask {
                    let p = UnsafeRawPointer(bitPattern: base)! + i * chunk
                    try await d.write(at: Int64(i * chunk), from: UnsafeRawBufferPointer(start: p, count: chunk), flags: [])
                }
            }
            try await g.waitForAll()
        }
        try await d.close()
        let log = s.log
        let connections = log.components(separatedBy: "\n").filter { $0.contains("Connect ") }
        XCTAssertEqual(connections.count, 3, log)
        // Every connection carried writes.
        let writers = Set(log.components(separatedBy: "\n").filter { $0.contains("Write ") }.compactMap { line in
            line.split(separator: " ").first { $0.hasPrefix("connection=") }
        })
        XCTAssertEqual(writers.count, 3, "writes went over \(writers)")
    }

    /// The goodbye (NBD_CMD_DISC) goes out on every connection, and closing does not wait for
    /// the server to hang up: a server that takes its time over that (here 30 s) is not waited
    /// for, where closing used to wait up to 2 s (and 3-6 ms for nbdkit at the end of every copy).
    func testCloseSaysGoodbyeWithoutWaitingForTheServerToHangUp() async throws {
        let s = try server(["--filter=delay", "memory", "8M", "delay-close=30"], debug: true)
        let d = try await NBDDevice.open(s.url, readOnly: false, connections: 2)
        XCTAssertEqual(d.connectionCount, 2)
        let b = TestBuffer(count: 1 << 20, fill: 0x5a)
        try await d.write(at: 4096, from: UnsafeRawBufferPointer(b.bytes), flags: [])
        try await d.flush()
        let closing = Date()
        try await d.close()
        XCTAssertLessThan(Date().timeIntervalSince(closing), 1.0, "close waited for the server to hang up")
        // nbdkit reports the goodbye as the connection reads it; give it a moment.
        let deadline = Date().addingTimeInterval(10)
        var goodbyes = 0
        while Date() < deadline {
            goodbyes = s.debugOutput.components(separatedBy: "client sent NBD_CMD_DISC").count - 1
            if goodbyes >= 2 { break }
            usleep(20_000)
        }
        XCTAssertEqual(goodbyes, 2, s.debugOutput)
        // What was written and flushed is there for the next client.
        let again = try await NBDDevice.open(s.url, readOnly: true, connections: 1)
        let back = TestBuffer(count: 1 << 20)
        try await again.read(at: 4096, into: back.bytes)
        XCTAssertTrue(back.allEqual(0x5a))
        try await again.close()
    }

    func testOneConnectionWithoutMultiConn() async throws {
        let s = try server(["--filter=multi-conn", "--filter=log", "memory", "8M",
                            "multi-conn-mode=disable", "logfile=\(dir.path)/srv.nbdlog"])
        let d = try await NBDDevice.open(s.url, readOnly: false, connections: 4)
        XCTAssertEqual(d.connectionCount, 1)
        XCTAssertFalse(d.capabilities.contains(.multiConn))
        try await d.close()
        XCTAssertEqual(s.log.components(separatedBy: "\n").filter { $0.contains("Connect ") }.count, 1)
    }

    func testReadOnlyExportCannotBeOpenedForWriting() async throws {
        let s = try server(["-r", "memory", "8M"])
        do {
            _ = try await NBDDevice.open(s.url, readOnly: false)
            XCTFail("opened a read-only export for writing")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .readOnly)
            XCTAssertEqual(e.path, s.url)
        }
        let d = try await NBDDevice.open(s.url, readOnly: true)
        let b = TestBuffer(count: 4096)
        do {
            try await d.write(at: 0, from: b.all, flags: [])
            XCTFail("wrote to a device opened read-only")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .readOnly)
        }
        try await d.close()
    }

    func testNotListening() async throws {
        let url = "nbd+unix:///?socket=\(dir.path)/nobody.sock"
        do {
            _ = try await NBDDevice.open(url, readOnly: true)
            XCTFail("connected to nothing")
        } catch let e as FerryError {
            XCTAssertEqual(e.path, url)
            XCTAssertTrue(e.description.hasPrefix("\(url): cannot connect"), e.description)
        }
        let tcp = "nbd://127.0.0.1:1"
        do {
            _ = try await NBDDevice.open(tcp, readOnly: true)
            XCTFail("connected to nothing")
        } catch let e as FerryError {
            XCTAssertTrue(e.description.contains("Connection refused"), e.description)
        }
    }

    func testUnknownExportName() async throws {
        let s = try server(["--filter=exportname", "memory", "8M", "exportname-strict=true", "exportname=good"])
        let good = try await NBDDevice.open(s.url(export: "good"), readOnly: true)
        try await good.close()
        let bad = s.url(export: "bad")
        do {
            _ = try await NBDDevice.open(bad, readOnly: true)
            XCTFail("opened an export that does not exist")
        } catch let e as FerryError {
            XCTAssertEqual(e.path, bad)
            XCTAssertTrue(e.description.contains("no export named 'bad'"), e.description)
        }
    }

    func testReadErrorNamesTheURLAndOffset() async throws {
        let path = try makeFile("data.raw", size: 4 << 20, data: [(0, 4 << 20, 1)])
        let s = try server(["--filter=error", "file", path, "error=EIO", "error-pread-rate=100%"])
        let d = try await NBDDevice.open(s.url, readOnly: true)
        let b = TestBuffer(count: 64 << 10)
        do {
            try await d.read(at: 1 << 20, into: b.bytes)
            XCTFail("read through an always-failing filter")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .io)
            XCTAssertEqual(e.path, s.url)
            XCTAssertEqual(e.offset, 1 << 20)
            XCTAssertEqual(e.description, "\(s.url): read failed: Input/output error at offset 1048576")
        }
        try await d.close()
    }

    func testServerKilledWithRequestsInFlight() async throws {
        let s = try server(["--filter=delay", "memory", "64M", "delay-read=200ms"])
        let d = try await NBDDevice.open(s.url, readOnly: true)
        let b = TestBuffer(count: 64 << 20)
        let base = UInt(bitPattern: b.bytes.baseAddress)
        let failures = Locked(0)
        let url = s.url
        let victim = s.process.processIdentifier
        // Killed while all 32 reads wait in the delay filter.
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.05) { kill(victim, SIGKILL) }
        await withTaskGroup(of: Void.self) { g in
            for i in 0 ..< 32 {
                g.addTask {
                    let p = UnsafeMutableRawPointer(bitPattern: base)! + i * (1 << 20)
                    do {
                        try await d.read(at: Int64(i << 20), into: UnsafeMutableRawBufferPointer(start: p, count: 1 << 20))
                    } catch let e as FerryError {
                        XCTAssertEqual(e.path, url)
                        XCTAssertNotNil(e.offset)
                        failures.withLock { $0 += 1 }
                    } catch {
                        XCTFail("not a FerryError: \(error)")
                    }
                }
            }
        }
        XCTAssertEqual(failures.withLock { $0 }, 32)
        // Later requests fail at once; closing still works.
        do {
            try await d.read(at: 0, into: UnsafeMutableRawBufferPointer(rebasing: b.bytes[0 ..< 4096]))
            XCTFail("read from a dead server")
        } catch let e as FerryError {
            XCTAssertTrue(e.description.contains("connection"), e.description)
        }
        try await d.close()
    }

    /// An NBD -> NBD copy runs its workers on the source's first loop thread (progress is
    /// reported from the worker that finished a request), and copies exactly.
    func testACopyBetweenExportsRunsOnTheSourcesLoop() async throws {
        // 24 runs of 1 MiB, 1.5 MiB apart.
        var runs: [(Int64, Int, UInt8)] = []
        for i in 0 ..< 24 { runs.append((Int64(i) * (5 << 19), 1 << 20, UInt8(i + 1))) }
        let path = try makeFile("src.raw", size: 64 << 20, data: runs)
        let a = try server(["file", path], name: "a")
        let b = try server(["memory", "64M"], name: "b")
        let source = try await NBDDevice.open(a.url, readOnly: true)
        let target = try await NBDDevice.open(b.url, readOnly: false)
        let loop = await withTaskExecutorPreference(source.completionExecutor) { pthread_self() }
        var config = CopyConfiguration()
        config.progressInterval = 0
        let seen = Locked<[pthread_t]>([])
        let stats = try await CopyEngine.copy(from: source, to: target, configuration: config) { _ in
            let me = pthread_self()
            seen.withLock { $0.append(me) }
        }
        XCTAssertEqual(stats.bytesRead, 24 << 20)
        let reports = seen.withLock { $0 }
        let onLoop = reports.filter { pthread_equal($0, loop) != 0 }.count
        // The count's first report and the last come from other tasks.
        XCTAssertGreaterThanOrEqual(onLoop, reports.count - 2, "\(onLoop) of \(reports.count) reports on the source's loop")
        XCTAssertGreaterThan(onLoop, 20)
        let want = TestBuffer(count: 64 << 20), got = TestBuffer(count: 64 << 20)
        try await source.read(at: 0, into: want.bytes)
        try await target.read(at: 0, into: got.bytes)
        XCTAssertEqual(memcmp(want.bytes.baseAddress!, got.bytes.baseAddress!, 64 << 20), 0, "the copy differs")
        try await source.close()
        try await target.close()
    }
}
