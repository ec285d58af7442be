import Foundation
import XCTest
import FerryCore
@testable import FerryFile
import CFerryLinux

/// Creation, extents, zeroing and its fallbacks, errors, block devices.
final class DeviceTests: FileTestCase {
    func testCreateIsSparseAndZeroInit() async throws {
        let p = path("sparse.img")
        let size: Int64 = 1 << 30
        let d = try await create(p, size: size, engine: .uring)
        XCTAssertEqual(d.size, size)
        XCTAssertFalse(d.isBlockDevice)
        XCTAssertTrue(d.capabilities.isSuperset(of: [.write, .zero, .extents, .flush, .zeroInit]))
        XCTAssertLessThanOrEqual(try FileDevice.allocatedSize(path: p), 8192)
        do { let got = try await d.extents(in: 0 ..< size); XCTAssertEqual(got, [Extent(offset: 0, length: size, kind: .zero)]) }
        XCTAssertEqual(d.limits.alignment, 1)
        XCTAssertEqual(d.limits.preferredTransfer, 1 << 20)
        try await d.close()
        // Opening it again: the same size, but nothing promises zeros any more.
        let o = try await open(p, engine: .threads)
        XCTAssertEqual(o.size, size)
        XCTAssertFalse(o.capabilities.contains(.zeroInit))
        let ro = try await open(p, engine: .uring, readOnly: true)
        XCTAssertFalse(ro.capabilities.contains(.write))
        let e = await ferryError { try await ro.write([1], at: 0) }
        XCTAssertEqual(e?.code, .readOnly)
    }

    func testExtentsOfFileWithHoles() async throws {
        for engine in engines {
            let p = path("holes-\(engine).img")
            let size: Int64 = 16 << 20
            let d = try await create(p, size: size, engine: engine)
            let data = [UInt8](repeating: 0xee, count: 64 << 10)
            try await d.write(data, at: 1 << 20)
            try await d.write(data, at: 5 << 20)
            try await d.write(data, at: 5 << 20 | 64 << 10)   // joins the previous run
            try await d.write([UInt8](repeating: 1, count: 4096), at: size - 4096)
            var all: [Extent] = []
            try await d.forEachExtent(in: 0 ..< size) { all.append($0) }
            XCTAssertEqual(all.coalesced(), [
                Extent(offset: 0, length: 1 << 20, kind: .zero),
                Extent(offset: 1 << 20, length: 64 << 10, kind: .data),
                Extent(offset: 1 << 20 | 64 << 10, length: (4 << 20) - (64 << 10), kind: .zero),
                Extent(offset: 5 << 20, length: 128 << 10, kind: .data),
                Extent(offset: 5 << 20 | 128 << 10, length: size - 4096 - (5 << 20 | 128 << 10), kind: .zero),
                Extent(offset: size - 4096, length: 4096, kind: .data),
            ], "\(engine)")
            // A query from the middle of a hole starts where asked and stays within the size.
            let part = try await d.extents(in: (2 << 20) ..< (3 << 20))
            XCTAssertEqual(part.first?.offset, 2 << 20)
            XCTAssertEqual(part.first?.kind, .zero)
            XCTAssertLessThanOrEqual(part.last?.end ?? 0, size)
            // Past the end: clamped to the size.
            let pastEnd = try await d.extents(in: size - 8192 ..< size + (1 << 20))
            XCTAssertEqual(pastEnd.coalesced(), [Extent(offset: size - 8192, length: 4096, kind: .zero),
                                                 Extent(offset: size - 4096, length: 4096, kind: .data)])
            let inData = try await d.extents(in: (5 << 20) + 100 ..< (5 << 20) + 200)
            XCTAssertEqual(inData.first, Extent(offset: (5 << 20) + 100, length: (128 << 10) - 100, kind: .data))
            try await d.close()
        }
    }

    /// A badly fragmented file is answered in batches, which together still describe it exactly.
    func testExtentsAreBatched() async throws {
        let p = path("fragmented.img")
        let blocks = 1500
        let size = Int64(blocks * 8192)
        let d = try await create(p, size: size, engine: .uring)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< blocks {
                g.addTask { try await d.write([UInt8](repeating: 3, count: 4096), at: Int64(i) * 8192 + 4096) }
            }
            try await g.waitForAll()
        }
        let first = try await d.extents(in: 0 ..< size)
        XCTAssertLessThanOrEqual(first.count, FileDevice.extentBatch)
        XCTAssertLessThan(first.last?.end ?? size, size, "the first answer stops early")
        var all: [Extent] = []
        try await d.forEachExtent(in: 0 ..< size) { all.append($0) }
        let merged = all.coalesced()
        XCTAssertEqual(merged.count, 2 * blocks)
        for (i, e) in merged.enumerated() {
            XCTAssertEqual(e, Extent(offset: Int64(i) * 4096, length: 4096, kind: i % 2 == 0 ? .zero : .data))
            if e != Extent(offset: Int64(i) * 4096, length: 4096, kind: i % 2 == 0 ? .zero : .data) { break }
        }
    }

    /// Each hole-then-data pair costs two lseeks, not three: the end of a hole is where data
    /// starts, so the walk asks SEEK_HOLE from there straight away. A copy maps its whole
    /// source before it starts, so on a fragmented file this is time spent before any data moves.
    func testExtentWalkSeeksTwicePerRun() async throws {
        let p = path("runs.img")
        let runs = 200
        let size = Int64(runs * 8192)
        let d = try await create(p, size: size, engine: .threads)
        for i in 0 ..< runs { try await d.write([UInt8](repeating: 7, count: 4096), at: Int64(i) * 8192 + 4096) }
        try await d.flush()
        let fd = Glibc.open(p, O_RDONLY)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { Glibc.close(fd) }
        var seeks = 0
        let result = FileDevice.mapExtents(fd: fd, from: 0, to: size, size: size,
                                           seekData: { seeks += 1; return ferry_seek_data(fd, $0) },
                                           seekHole: { seeks += 1; return ferry_seek_hole(fd, $0) })
        guard case .success(let extents) = result else { return XCTFail("\(result)") }
        XCTAssertEqual(extents.coalesced().count, 2 * runs)
        XCTAssertEqual(extents.coalesced().last, Extent(offset: size - 4096, length: 4096, kind: .data))
        XCTAssertLessThanOrEqual(seeks, 2 * runs + 1)
        try await d.close()
    }

    func testWriteZeroesWithAndWithoutUnmap() async throws {
        for engine in engines {
            let p = path("zero-\(engine).img")
            let size: Int64 = 8 << 20
            let d = try await create(p, size: size, engine: engine)
            try await d.write([UInt8](repeating: 0xab, count: Int(size)), at: 0)
            try await d.flush()
            let full = try FileDevice.allocatedSize(path: p)
            XCTAssertGreaterThanOrEqual(full, size)
            XCTAssertEqual(d.zeroMethod(mayUnmap: true), .punchHole)
            XCTAssertEqual(d.zeroMethod(mayUnmap: false), .zeroRange)

            // Punching frees the blocks.
            try await d.writeZeroes(at: 1 << 20, length: 2 << 20, flags: [.mayUnmap])
            do { let got = try await d.read(2 << 20, at: 1 << 20); XCTAssertTrue(got.allSatisfy { $0 == 0 }) }
            let punched = try FileDevice.allocatedSize(path: p)
            XCTAssertLessThanOrEqual(punched, full - (2 << 20) + 4096, "\(engine): punch hole frees space")

            // Zeroing without unmap keeps them.
            try await d.writeZeroes(at: 4 << 20, length: 1 << 20, flags: [])
            do { let got = try await d.read(1 << 20, at: 4 << 20); XCTAssertTrue(got.allSatisfy { $0 == 0 }) }
            XCTAssertGreaterThanOrEqual(try FileDevice.allocatedSize(path: p), punched, "\(engine): zero range stays allocated")

            // Unaligned edges, fast only, a range running past the end (clamped).
            try await d.writeZeroes(at: 6 << 20 | 100, length: 1000, flags: [.fastOnly])
            try await d.writeZeroes(at: size - 10, length: 1 << 20, flags: [.mayUnmap])
            let edge = try await d.read(1002, at: 6 << 20 | 99)
            XCTAssertEqual(edge.first, 0xab)
            XCTAssertEqual(edge.last, 0xab)
            XCTAssertTrue(edge.dropFirst().dropLast().allSatisfy { $0 == 0 })
            let end = try await d.read(11, at: size - 11)
            XCTAssertEqual(end, [0xab] + [UInt8](repeating: 0, count: 10))
            XCTAssertEqual(d.zeroRefusals, 0)

            // Discard punches too.
            try await d.discard(at: 0, length: 1 << 20)
            do { let got = try await d.read(1 << 20, at: 0); XCTAssertTrue(got.allSatisfy { $0 == 0 }) }
            try await d.close()
        }
    }

    /// tmpfs has no FALLOC_FL_ZERO_RANGE: zeroing falls back to writing zeros, learns it once,
    /// and `.fastOnly` then refuses up front without touching the data.
    func testZeroFallbackOnTmpfsIsRemembered() async throws {
        let mnt = try mountTmpfs(size: "8m")
        for engine in engines {
            let p = mnt + "/zero-\(engine).img"
            let d = try await create(p, size: 4 << 20, engine: engine)
            try await d.write([UInt8](repeating: 0xcd, count: 3 << 20), at: 0)
            XCTAssertEqual(d.zeroMethod(mayUnmap: false), .zeroRange)

            // Several 1 MiB pieces of zeros, the first one not aligned.
            let zeroed = (4096 + 7) ..< (3 << 20) - 100
            try await d.writeZeroes(at: Int64(zeroed.lowerBound), length: Int64(zeroed.count), flags: [])
            let all = try await d.read(3 << 20, at: 0)
            XCTAssertTrue(all[zeroed].allSatisfy { $0 == 0 }, "\(engine): zeroed")
            XCTAssertTrue(all[..<zeroed.lowerBound].allSatisfy { $0 == 0xcd }, "\(engine): before")
            XCTAssertTrue(all[zeroed.upperBound...].allSatisfy { $0 == 0xcd }, "\(engine): after")
            XCTAssertGreaterThanOrEqual(try FileDevice.allocatedSize(path: p), 3 << 20, "still allocated")
            try await d.write([UInt8](repeating: 0xcd, count: 256 << 10), at: 0)
            XCTAssertEqual(d.zeroMethod(mayUnmap: false), .writeZeros, "\(engine): fallback remembered")
            XCTAssertEqual(d.zeroRefusals, 1)

            try await d.writeZeroes(at: 128 << 10, length: 64 << 10, flags: [])
            do { let got = try await d.read(64 << 10, at: 128 << 10); XCTAssertTrue(got.allSatisfy { $0 == 0 }) }
            XCTAssertEqual(d.zeroRefusals, 1, "\(engine): ZERO_RANGE is not tried again")

            let e = await ferryError { try await d.writeZeroes(at: 200 << 10, length: 8192, flags: [.fastOnly]) }
            XCTAssertEqual(e?.code, .notSupported)
            do { let got = try await d.read(8192, at: 200 << 10); XCTAssertTrue(got.allSatisfy { $0 == 0xcd }, "untouched") }

            // Punching a hole works on tmpfs and frees the pages.
            XCTAssertEqual(d.zeroMethod(mayUnmap: true), .punchHole)
            let before = try FileDevice.allocatedSize(path: p)
            try await d.writeZeroes(at: 192 << 10, length: 64 << 10, flags: [.mayUnmap, .fastOnly])
            do { let got = try await d.read(64 << 10, at: 192 << 10); XCTAssertTrue(got.allSatisfy { $0 == 0 }) }
            XCTAssertLessThanOrEqual(try FileDevice.allocatedSize(path: p), before - (64 << 10))
            try await d.close()
            unlink(p)
        }
    }

    func testErrorMessages() async throws {
        let missing = path("nope.img")
        var e = await ferryError { _ = try await FileDevice.open(path: missing) }
        XCTAssertEqual(e?.code, .notFound)
        XCTAssertEqual(e?.description, "\(missing): could not open: No such file or directory")

        let inMissingDir = path("no/such/dir/out.img")
        e = await ferryError { _ = try await FileDevice.create(path: inMissingDir, size: 1) }
        XCTAssertEqual(e?.code, .notFound)
        XCTAssertEqual(e?.description, "\(inMissingDir): cannot create: directory '\(path("no/such/dir"))' does not exist")

        for readOnly in [true, false] {
            e = await ferryError { _ = try await FileDevice.open(path: self.dir, options: .init(readOnly: readOnly)) }
            XCTAssertEqual(e?.code, .isDirectory)
            XCTAssertEqual(e?.description, "\(dir): is a directory, not an image file")
        }
        e = await ferryError { _ = try await FileDevice.create(path: self.dir, size: 1) }
        XCTAssertEqual(e?.description, "\(dir): is a directory, not an image file")

        e = await ferryError { _ = try await FileDevice.open(path: "/dev/null") }
        XCTAssertEqual(e?.description, "/dev/null: is not a regular file or block device")
    }

    func testCallsAfterCloseThrow() async throws {
        for engine in engines {
            let p = path("closed-\(engine).img")
            let d = try await create(p, size: 8192, engine: engine)
            try await d.close()
            try await d.close()   // a second close does nothing
            for call in [
                { _ = try await d.read(1, at: 0) },
                { try await d.write([1], at: 0) },
                { try await d.writeZeroes(at: 0, length: 10, flags: []) },
                { _ = try await d.extents(in: 0 ..< 10) },
                { try await d.flush() },
            ] as [() async throws -> Void] {
                let e = await ferryError(call)
                XCTAssertEqual(e?.description, "\(p): the device is closed")
            }
        }
    }

    /// A loop device over a sparse file: size by BLKGETSIZE64, I/O, zeroing, create's checks.
    func testLoopBlockDevice() async throws {
        let backing = path("loop-backing.img")
        let size: Int64 = 8 << 20
        XCTAssertTrue(FileManager.default.createFile(atPath: backing, contents: nil))
        XCTAssertEqual(truncate(backing, off_t(size)), 0)
        let dev = try attachLoop(backing)
        XCTAssertEqual(try FileDevice.allocatedSize(path: dev), size)

        for (engine, direct) in [(FileDevice.IOEngine.uring, false), (.threads, false), (.uring, true), (.threads, true)] {
            let d = try await open(dev, engine: engine, direct: direct)
            let what = "\(engine) direct=\(direct)"
            XCTAssertTrue(d.isBlockDevice)
            XCTAssertEqual(d.size, size)
            XCTAssertFalse(d.capabilities.contains(.extents))
            XCTAssertFalse(d.capabilities.contains(.zeroInit))
            XCTAssertEqual(d.limits.alignment, direct ? 512 : 1, what)
            do { let got = try await d.extents(in: 4096 ..< 8192); XCTAssertEqual(got, [Extent(offset: 4096, length: size - 4096, kind: .data)]) }

            var rng = Pattern(seed: 11)
            let data = rng.bytes(1 << 20)
            try await d.write(data, at: 1 << 20)
            do { let got = try await d.read(1 << 20, at: 1 << 20); XCTAssertEqual(got, data, what) }

            try await d.writeZeroes(at: 1 << 20, length: 256 << 10, flags: [.mayUnmap])
            try await d.writeZeroes(at: (1 << 20) + (512 << 10), length: 256 << 10, flags: [])
            // Not sector aligned: the odd bytes are written, the rest zeroed by the kernel.
            try await d.writeZeroes(at: (1 << 20) + (900 << 10) + 100, length: 5000, flags: [])
            var expected = data
            for r in [0 ..< (256 << 10), (512 << 10) ..< (768 << 10), (900 << 10) + 100 ..< (900 << 10) + 5100] {
                expected.replaceSubrange(r, with: [UInt8](repeating: 0, count: r.count))
            }
            do { let got = try await d.read(1 << 20, at: 1 << 20); XCTAssertEqual(got, expected, what) }
            try await d.discard(at: 0, length: 4096)
            try await d.flush()
            try await d.close()
        }
        // create() opens an existing block device if it is big enough, without zeroInit.
        let c = try await FileDevice.create(path: dev, size: 4 << 20)
        XCTAssertTrue(c.isBlockDevice)
        XCTAssertEqual(c.size, size)
        XCTAssertFalse(c.capabilities.contains(.zeroInit))
        try await c.close()
        let e = await ferryError { _ = try await FileDevice.create(path: dev, size: 16 << 20) }
        XCTAssertEqual(e?.code, .tooSmall)
        XCTAssertEqual(e?.path, dev)
    }

    /// Closing (or dropping) a device stops its I/O threads.
    func testCloseStopsTheIOThreads() async throws {
        // Ferry's own threads, by the names it gives them.
        func threads() -> Int {
            let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
            return tasks.filter { t in
                let comm = (try? String(contentsOfFile: "/proc/self/task/\(t)/comm", encoding: .utf8)) ?? ""
                return comm.hasPrefix("ferry-")
            }.count
        }
        // Threads of devices closed by earlier tests may still be on their way out.
        for _ in 0 ..< 100 where threads() > 0 { try await Task.sleep(for: .milliseconds(20)) }
        let before = threads()
        var open: [FileDevice] = []
        for i in 0 ..< 12 {
            let engine = engines[i % 2]
            let d = try await FileDevice.create(path: path("t\(i).img"), size: 1 << 20,
                                                options: .init(engine: engine))
            XCTAssertEqual(d.engineInUse, engine)
            try await withThrowingTaskGroup(of: Void.self) { g in
                for j in 0 ..< 4 { g.addTask { try await d.write([1], at: Int64(j) * 4096) } }
                try await g.waitForAll()
            }
            _ = try await d.extents(in: 0 ..< 4096)
            open.append(d)
        }
        XCTAssertGreaterThanOrEqual(threads(), before + 12, "every device has I/O threads")
        for d in open.prefix(8) { try await d.close() }
        open.removeAll()   // the other four are dropped without close
        var after = threads()
        for _ in 0 ..< 100 where after > before {
            try await Task.sleep(for: .milliseconds(20))
            after = threads()
        }
        XCTAssertLessThanOrEqual(after, before, "I/O threads are gone")
    }
}
