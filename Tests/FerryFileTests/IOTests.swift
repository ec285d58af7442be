import Foundation
import XCTest
import FerryCore
@testable import FerryFile
import CFerryLinux

/// Reads and writes on both engines: data integrity, concurrency, O_DIRECT tails, short reads.
final class IOTests: FileTestCase {
    func testRoundTripAtOddOffsets() async throws {
        for engine in engines {
            let p = path("rt-\(engine).img")
            let size: Int64 = 3 << 20 | 123
            let d = try await create(p, size: size, engine: engine)
            var expected = [UInt8](repeating: 0, count: Int(size))
            var rng = Pattern(seed: 42)
            let pieces: [(Int64, Int)] = [(1, 7), (4097, 65_535), (1 << 20 | 333, 300_001), (size - 1, 1),
                                          (size - 5000, 5000), (0, 1), (2 << 20 | 4095, 4097)]
            for (offset, count) in pieces {
                let data = rng.bytes(count)
                try await d.write(data, at: offset)
                expected.replaceSubrange(Int(offset) ..< Int(offset) + count, with: data)
            }
            for (offset, count) in pieces {
                let got = try await d.read(count, at: offset)
                XCTAssertEqual(got, Array(expected[Int(offset) ..< Int(offset) + count]), "\(engine) at \(offset)")
            }
            let whole = try await d.read(Int(size), at: 0)
            XCTAssertEqual(whole, expected, "\(engine): whole image")
            try await d.flush()
            try await d.close()
            XCTAssertEqual(fileContents(p), expected, "\(engine): on disk")
        }
    }

    func testManyConcurrentRequests() async throws {
        for engine in engines {
            let p = path("conc-\(engine).img")
            let chunk = 64 << 10
            let count = 64
            let d = try await create(p, size: Int64(chunk * count), engine: engine)
            try await withThrowingTaskGroup(of: Void.self) { g in
                for i in 0 ..< count {
                    g.addTask {
                        var rng = Pattern(seed: UInt64(i + 1))
                        try await d.write(rng.bytes(chunk), at: Int64(i * chunk))
                    }
                }
                try await g.waitForAll()
            }
            let mismatches = try await withThrowingTaskGroup(of: Int.self) { g in
                for i in 0 ..< count {
                    g.addTask {
                        var rng = Pattern(seed: UInt64(i + 1))
                        let got = try await d.read(chunk, at: Int64(i * chunk))
                        return got == rng.bytes(chunk) ? 0 : 1
                    }
                }
                return try await g.reduce(0, +)
            }
            XCTAssertEqual(mismatches, 0, "\(engine)")
            try await d.close()
        }
    }

    /// More requests than the ring has slots: the rest wait on the queue and all complete.
    func testMoreRequestsThanRingEntries() async throws {
        let p = path("small-ring.img")
        var o = FileDevice.Options(engine: .uring)
        o.ringEntries = 8
        let d = track(try await FileDevice.create(path: p, size: 1 << 20, options: o))
        XCTAssertEqual(d.engineInUse, .uring)
        let n = 200
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0 ..< n {
                g.addTask { try await d.write([UInt8](repeating: UInt8(i & 0xff), count: 4096), at: Int64(i) * 4096) }
            }
            try await g.waitForAll()
        }
        let ring = try XCTUnwrap(d.executor as? RingEngine)
        XCTAssertLessThanOrEqual(ring.peakInFlight, 7)
        XCTAssertGreaterThan(ring.peakInFlight, 1, "requests should overlap in the ring")
        let all = try await d.read(n * 4096, at: 0)
        for i in 0 ..< n {
            XCTAssertTrue(all[i * 4096 ..< (i + 1) * 4096].allSatisfy { $0 == UInt8(i & 0xff) }, "block \(i)")
        }
    }

    /// A read of what the page cache holds is copied on the caller's thread; where the cache
    /// stops, the engine reads the rest, and the bytes are the file's either way.
    func testCachedPartReadOnCallersThread() async throws {
        let mib = 1 << 20
        for engine in engines {
            let p = path("cached-\(engine).img")
            var rng = Pattern(seed: 11)
            let bytes = rng.bytes(4 * mib)
            try Data(bytes).write(to: URL(fileURLWithPath: p))
            // Out of the cache: the second half, then (for the second device) all of it.
            func evict(from: Int, count: Int) throws {
                let fd = Glibc.open(p, O_RDONLY)
                XCTAssertGreaterThanOrEqual(fd, 0)
                defer { Glibc.close(fd) }
                XCTAssertEqual(fsync(fd), 0)
                XCTAssertEqual(posix_fadvise(fd, off_t(from), off_t(count), POSIX_FADV_DONTNEED), 0)
            }
            try evict(from: 2 * mib, count: 2 * mib)
            let d = try await open(p, engine: engine, readOnly: true)
            let all = try await d.read(4 * mib, at: 0)
            XCTAssertTrue(all == bytes, "\(engine): the bytes read")
            XCTAssertEqual(d.cachedReadBytes, Int64(2 * mib), "\(engine): the cached half, on the caller's thread")
            // The engine's read left the second half in the cache.
            let again = try await d.read(mib, at: Int64(3 * mib))
            XCTAssertTrue(again[...] == bytes[3 * mib ..< 4 * mib], "\(engine)")
            XCTAssertEqual(d.cachedReadBytes, Int64(3 * mib), "\(engine)")
            try await d.close()

            try evict(from: 0, count: 4 * mib)
            let cold = try await open(p, engine: engine, readOnly: true)
            let read = try await cold.read(4 * mib, at: 0)
            XCTAssertTrue(read == bytes, "\(engine): the bytes read cold")
            XCTAssertEqual(cold.cachedReadBytes, 0, "\(engine): nothing cached, all through the engine")
            try await cold.close()
        }
    }

    /// O_DIRECT on an image whose size is not a multiple of 512: the aligned part goes direct,
    /// the tail through the page cache, and both read back.
    func testDirectWithUnalignedTail() async throws {
        for engine in engines {
            let p = path("direct-\(engine).img")
            let size: Int64 = (1 << 20) + 1000
            try await create(p, size: size, engine: engine).close()
            let d = try await open(p, engine: engine, direct: true)
            XCTAssertTrue(d.isDirect)
            XCTAssertGreaterThanOrEqual(d.limits.alignment, 512)
            XCTAssertEqual(d.limits.alignment & (d.limits.alignment - 1), 0)
            var rng = Pattern(seed: 7)
            // The last 64 KiB + 1000 bytes in one request, aligned at its start.
            let tailStart: Int64 = (1 << 20) - (64 << 10)
            let tail = rng.bytes(Int(size - tailStart))
            try await d.write(tail, at: tailStart)
            // An aligned block in the middle, and an unaligned piece (through the page cache).
            let middle = rng.bytes(8192)
            try await d.write(middle, at: 65536)
            let odd = rng.bytes(100)
            try await d.write(odd, at: 12345)
            let lastBytes = rng.bytes(10)
            try await d.write(lastBytes, at: size - 10)
            var expected = [UInt8](repeating: 0, count: Int(size))
            expected.replaceSubrange(Int(tailStart)..., with: tail)
            expected.replaceSubrange(65536 ..< 65536 + 8192, with: middle)
            expected.replaceSubrange(12345 ..< 12445, with: odd)
            expected.replaceSubrange(Int(size) - 10 ..< Int(size), with: lastBytes)
            do { let got = try await d.read(Int(size - tailStart), at: tailStart); XCTAssertEqual(got, Array(expected[Int(tailStart)...])) }
            do { let got = try await d.read(Int(size), at: 0); XCTAssertEqual(got, expected, "\(engine): whole image, direct") }
            do { let got = try await d.read(488, at: size - 488); XCTAssertEqual(got, Array(expected[Int(size) - 488 ..< Int(size)])) }
            try await d.flush()
            try await d.close()
            XCTAssertEqual(fileContents(p), expected, "\(engine): on disk")
        }
    }

    /// A large source mostly not in the page cache is read with O_DIRECT (and reads what is
    /// on disk, aligned or not); the same file cached, or a small file, is read through the cache.
    func testColdLargeSourceIsReadDirect() async throws {
        guard ferry_cached_bytes(-1) != -Int64(ENOSYS) else { throw XCTSkip("no cachestat(2) (Linux before 6.5)") }
        let p = path("cold.img")
        let size = Opened.directReadMinimum + (1 << 20) + 777
        var rng = Pattern(seed: 11)
        let data = rng.bytes(Int(size))
        XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(data)))
        // Written back, then dropped from the cache: cold.
        let fd = Glibc.open(p, O_RDONLY)
        XCTAssertEqual(fsync(fd), 0)
        XCTAssertEqual(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0)
        XCTAssertLessThan(ferry_cached_bytes(fd), size / 2)
        func openCold(_ engine: FileDevice.IOEngine) async throws -> FileDevice {
            var o = FileDevice.Options(readOnly: true, engine: engine)
            o.directIfCold = true
            return track(try await FileDevice.open(path: p, options: o))
        }
        for engine in engines {
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            let d = try await openCold(engine)
            XCTAssertTrue(d.isDirect, "\(engine): cold and large")
            let whole = try await d.read(Int(size), at: 0)
            XCTAssertTrue(whole == data, "\(engine): whole file")
            let odd = try await d.read(10_000, at: 4097)
            XCTAssertEqual(odd, Array(data[4097 ..< 14097]), "\(engine): unaligned")
            let tail = try await d.read(1777, at: size - 1777)
            XCTAssertEqual(tail, Array(data[Int(size) - 1777 ..< Int(size)]), "\(engine): tail")
            try await d.close()
        }
        // Now in the cache (read through it): not direct.
        XCTAssertEqual(fileContents(p).count, Int(size))
        XCTAssertGreaterThanOrEqual(ferry_cached_bytes(fd), size / 2)
        let warm = try await openCold(.uring)
        XCTAssertFalse(warm.isDirect, "cached")
        try await warm.close()
        close(fd)
        // Small files are never worth it.
        let small = path("small.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: small, contents: Data(data.prefix(1 << 20))))
        let sfd = Glibc.open(small, O_RDONLY)
        XCTAssertEqual(fsync(sfd), 0)
        _ = posix_fadvise(sfd, 0, 0, POSIX_FADV_DONTNEED)
        close(sfd)
        var o = FileDevice.Options(readOnly: true, engine: .uring)
        o.directIfCold = true
        let s = track(try await FileDevice.open(path: small, options: o))
        XCTAssertFalse(s.isDirect, "small")
        try await s.close()
    }

    /// A file truncated under an open device reads short: `.shortRead` with the offset where it ended.
    func testTruncatedFileGivesShortRead() async throws {
        for engine in engines {
            for direct in [false, true] {
                let p = path("short-\(engine)-\(direct).img")
                let size: Int64 = 1 << 20
                let w = try await create(p, size: size, engine: engine)
                var rng = Pattern(seed: 9)
                try await w.write(rng.bytes(Int(size)), at: 0)
                try await w.close()
                let d = try await open(p, engine: engine, direct: direct, readOnly: true)
                XCTAssertEqual(truncate(p, 300_000), 0)
                let e = await ferryError { _ = try await d.read(Int(size), at: 0) }
                XCTAssertEqual(e?.code, .shortRead, "\(engine) direct=\(direct)")
                XCTAssertEqual(e?.offset, 300_000, "\(engine) direct=\(direct)")
                XCTAssertEqual(e?.path, p)
                XCTAssertTrue(e?.description.contains("unexpected end of file: the image is shorter than its size 1048576 at offset 300000") ?? false,
                              e?.description ?? "")
                // Reading before the cut still works.
                do { let got = try await d.read(4096, at: 0); XCTAssertEqual(got.count, 4096) }
                try await d.close()
            }
        }
    }

    /// With `writeBehind`, the dirty pages of a file being written go to the disk while the
    /// writing goes on, not only at the flush. Judged by filefrag: on a filesystem with delayed
    /// allocation, pages nobody has started writing back are still "delalloc" extents.
    func testWriteBehindStartsWriteBackBeforeTheFlush() async throws {
        let total = 32 << 20, piece = 1 << 20
        let behind: Int64 = 4 << 20
        var rng = Pattern(seed: 21)
        let data = rng.bytes(piece)
        for engine in engines {
            for writeBehind in [0, behind] {
                let p = path("behind-\(engine)-\(writeBehind).img")
                var o = FileDevice.Options(engine: engine)
                o.writeBehind = writeBehind
                let d = track(try await FileDevice.create(path: p, size: Int64(total), options: o))
                XCTAssertEqual(d.writeBehind, writeBehind)
                for k in 0 ..< total / piece { try await d.write(data, at: Int64(k * piece)) }
                var pending = try delallocBytes(p)
                if writeBehind == 0 {
                    guard pending > 0 else { throw XCTSkip("\(dir): the filesystem does not delay allocation") }
                    try await Task.sleep(for: .seconds(1))
                    pending = try delallocBytes(p)
                    XCTAssertEqual(pending, Int64(total), "\(engine): without write-behind nothing is written back yet")
                } else {
                    // The last start may still be running: wait for it, not for the kernel's own.
                    let deadline = ContinuousClock.now + .seconds(10)
                    while pending > 2 * writeBehind && ContinuousClock.now < deadline {
                        try await Task.sleep(for: .milliseconds(20))
                        pending = try delallocBytes(p)
                    }
                    XCTAssertLessThanOrEqual(pending, 2 * writeBehind, "\(engine): written back while writing")
                }
                try await d.flush()
                XCTAssertEqual(try delallocBytes(p), 0, "\(engine): all on disk after the flush")
                try await d.close()
                let back = fileContents(p)
                XCTAssertEqual(back.count, total)
                let same = back.withUnsafeBytes { b in
                    data.withUnsafeBytes { d in
                        stride(from: 0, to: total, by: piece).allSatisfy { memcmp(b.baseAddress! + $0, d.baseAddress!, piece) == 0 }
                    }
                }
                XCTAssertTrue(same, "\(engine): contents")
            }
        }
        // Nothing to start for O_DIRECT or O_DSYNC writes, nor for a read-only file.
        for (direct, sync) in [(true, false), (false, true)] {
            var o = FileDevice.Options(direct: direct, sync: sync)
            o.writeBehind = behind
            let d = track(try await FileDevice.create(path: path("no-behind-\(direct)-\(sync).img"), size: 1 << 20, options: o))
            XCTAssertEqual(d.writeBehind, 0, "direct \(direct), sync \(sync)")
            try await d.close()
        }
        var o = FileDevice.Options(readOnly: true)
        o.writeBehind = behind
        let r = track(try await FileDevice.open(path: path("no-behind-true-false.img"), options: o))
        XCTAssertEqual(r.writeBehind, 0, "read-only")
        try await r.close()
    }

    /// Bytes of `path` in delayed-allocation extents (dirty, write-back not started), from
    /// `filefrag -v`: "ext: logical_offset: physical_offset: length: expected: flags:" rows.
    private func delallocBytes(_ path: String) throws -> Int64 {
        let r = run("/usr/sbin/filefrag", "-v", path)
        guard r.status == 0 else { throw XCTSkip("filefrag (e2fsprogs) cannot map \(path)") }
        var blockSize: Int64 = 0
        var bytes: Int64 = 0
        for line in r.output.split(separator: "\n") {
            if line.hasPrefix("File size of"), let open = line.range(of: "blocks of ") {
                blockSize = Int64(line[open.upperBound...].prefix { $0.isNumber }) ?? 0
            }
            guard line.contains("delalloc") else { continue }
            // "   0:        0..    4095:          0..         0:      0:   last,unknown_loc,delalloc,eof"
            let fields = line.split(separator: ":")
            guard fields.count > 1 else { continue }
            let range = fields[1].split(separator: ".").compactMap { Int64($0.trimmingCharacters(in: .whitespaces)) }
            guard range.count == 2 else { continue }
            bytes += (range[1] - range[0] + 1) * blockSize
        }
        return bytes
    }

    func testFuaWriteAndFlush() async throws {
        for engine in engines {
            let p = path("fua-\(engine).img")
            let d = try await create(p, size: 1 << 16, engine: engine)
            XCTAssertTrue(d.capabilities.contains(.fua))
            try await d.write([1, 2, 3], at: 100, flags: .fua)
            try await d.flush()
            XCTAssertEqual(Array(fileContents(p)[100 ..< 103]), [1, 2, 3])
            try await d.close()
        }
    }

    func testEnvironmentForcesThreads() async throws {
        let p = path("env.img")
        setenv("FERRY_IO", "threads", 1)
        defer { unsetenv("FERRY_IO") }
        let d = track(try await FileDevice.create(path: p, size: 4096))
        XCTAssertEqual(d.engineInUse, .threads)
        try await d.write([9], at: 0)
        do { let got = try await d.read(1, at: 0); XCTAssertEqual(got, [9]) }
        unsetenv("FERRY_IO")
        let u = track(try await FileDevice.open(path: p))
        XCTAssertEqual(u.engineInUse, .uring, "auto uses io_uring on this machine")
    }

    /// When the kernel refuses io_uring (here: a ring of 0 entries), the thread pool takes over.
    func testRefusedRingFallsBackToThreads() async throws {
        let p = path("refused.img")
        var o = FileDevice.Options(engine: .uring)
        o.ringEntries = 0
        let d = track(try await FileDevice.create(path: p, size: 1 << 20, options: o))
        XCTAssertEqual(d.engineInUse, .threads)
        var rng = Pattern(seed: 5)
        let data = rng.bytes(300_000)
        try await d.write(data, at: 77)
        do { let got = try await d.read(300_000, at: 77); XCTAssertEqual(got, data) }
    }

    func testNoSpaceOnTinyTmpfs() async throws {
        let mnt = try mountTmpfs(size: "1m")
        for engine in engines {
            let p = mnt + "/full-\(engine).img"
            let d = try await create(p, size: 4 << 20, engine: engine)
            let data = [UInt8](repeating: 0x5a, count: 2 << 20)
            let e = await ferryError { try await d.write(data, at: 0) }
            XCTAssertEqual(e?.code, .noSpace, "\(engine)")
            XCTAssertEqual(e?.path, p)
            // The first write stops short when the space runs out; the rest, resubmitted, fails there.
            XCTAssertGreaterThan(e?.offset ?? 0, 0, "\(engine): the short write was resubmitted")
            XCTAssertLessThanOrEqual(e?.offset ?? .max, 1 << 20)
            XCTAssertTrue(e?.description.hasPrefix("\(p): write failed: No space left on device at offset ") ?? false,
                          e?.description ?? "")
            try await d.close()
            unlink(p)
        }
    }
}
