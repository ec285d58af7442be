import XCTest
import FerryCore
@testable import FerryConvert

/// The copy engine against in-memory devices: exact data, order, bounds, errors.
final class EngineTests: XCTestCase {
    /// A source with a random map of data chunks, zero-filled data chunks and holes.
    func makeSource(size: Int64, chunk: Int = 4096, seed: UInt64, latency: Duration? = nil, jitter: Duration? = nil,
                    alignment: Int = 1, name: String = "src") async throws -> MemoryDevice {
        let dev = MemoryDevice(name: name, size: size, chunkSize: chunk,
                               limits: BlockLimits(alignment: alignment, preferredTransfer: 65536, maximumTransfer: 1 << 20),
                               latency: latency, jitter: jitter)
        var rng = SplitMix(seed: seed)
        var pos: Int64 = 0
        while pos < size {
            let run = Int64(1 + rng.next() % 40) * Int64(chunk)
            let n = min(run, size - pos)
            switch rng.next() % 4 {
            case 0, 1:
                var bytes = [UInt8](repeating: 0, count: Int(n))
                for i in 0 ..< bytes.count where i % 7 != 0 { bytes[i] = UInt8(truncatingIfNeeded: rng.next()) }
                try await dev.write(at: pos, bytes: bytes)
            case 2:
                // Allocated but all zeros: only zero detection finds these.
                try await dev.writeZeroes(at: pos, length: n, flags: [])
            default:
                break
            }
            pos += n
        }
        // The memory device doesn't delay writes made while building it; reset nothing else.
        return dev
    }

    func copy(_ src: MemoryDevice, _ dst: MemoryDevice, _ configure: (inout CopyConfiguration) -> Void = { _ in }) async throws -> CopyStats {
        var c = CopyConfiguration()
        configure(&c)
        return try await CopyEngine.copy(from: src, to: dst, configuration: c)
    }

    func testRandomMapsCopyExactlyInEveryMode() async throws {
        for seed in 1 ... 6 as ClosedRange<UInt64> {
            let size = Int64(3 << 20) + Int64(seed) * 4096 + (seed % 2 == 0 ? 1000 : 0)
            let src = try await makeSource(size: size, seed: seed)
            for (workers, outOfOrder, sparse, buffer) in [(1, false, 4096, 65536), (8, false, 4096, 1 << 20),
                                                         (16, true, 4096, 65536), (4, true, 0, 65536), (3, false, 65536, 131072)] {
                let dst = MemoryDevice(name: "dst", size: size)
                let stats = try await copy(src, dst) {
                    $0.workers = workers; $0.outOfOrder = outOfOrder; $0.sparseSize = sparse; $0.bufferSize = buffer
                    $0.targetReadsZero = true
                }
                XCTAssertEqual(dst.contents(), src.contents(), "seed \(seed) workers \(workers) -W \(outOfOrder) -S \(sparse)")
                XCTAssertEqual(stats.completedThrough, size)
                XCTAssertEqual(stats.bytesWritten + stats.bytesZeroed + stats.bytesSkipped, size, "every byte accounted once")
                if sparse == 0 {
                    XCTAssertEqual(stats.bytesWritten, size, "-S 0 writes every byte")
                    XCTAssertEqual(dst.allocatedChunks.count, Int((size + 4095) / 4096), "-S 0 leaves the target fully allocated")
                }
            }
        }
    }

    func testInOrderModeWritesAscendingOffsets() async throws {
        let size: Int64 = 4 << 20
        let src = try await makeSource(size: size, seed: 42, latency: .microseconds(200), jitter: .milliseconds(3))
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush])
        _ = try await copy(src, dst) { $0.workers = 16; $0.bufferSize = 65536 }
        XCTAssertEqual(dst.contents(), src.contents())
        var last: Int64 = -1
        var writes = 0
        for op in dst.operations {
            guard let (o, l) = op.range else { continue }
            XCTAssertGreaterThanOrEqual(o, last, "write at \(o) came after one ending at \(last)")
            last = o + l
            writes += 1
        }
        XCTAssertGreaterThan(writes, 20)
        XCTAssertGreaterThan(src.peakInFlight, 4, "reads ran in parallel")
    }

    /// In order means issued in order, not one at a time: a slow target gets the next
    /// write while the previous one is still in flight.
    func testInOrderModeKeepsSeveralWritesInFlightOnASlowTarget() async throws {
        let size: Int64 = 4 << 20
        let src = try await makeSource(size: size, seed: 11)
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush],
                               latency: .milliseconds(2), jitter: .milliseconds(3))
        _ = try await copy(src, dst) { $0.workers = 8; $0.bufferSize = 65536 }
        XCTAssertEqual(dst.contents(), src.contents())
        var last: Int64 = -1
        for op in dst.operations {
            guard let (o, l) = op.range else { continue }
            XCTAssertGreaterThanOrEqual(o, last, "write at \(o) was issued after one ending at \(last)")
            last = o + l
        }
        XCTAssertGreaterThan(dst.peakInFlight, 2, "ordered writes overlapped on the target")
    }

    func testOutOfOrderModeWritesSameDataAndDoesReorder() async throws {
        let size: Int64 = 4 << 20
        let src = try await makeSource(size: size, seed: 7, latency: .microseconds(200), jitter: .milliseconds(3))
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush])
        _ = try await copy(src, dst) { $0.workers = 16; $0.bufferSize = 65536; $0.outOfOrder = true }
        XCTAssertEqual(dst.contents(), src.contents())
        let offsets = dst.operations.compactMap { $0.range?.0 }
        XCTAssertNotEqual(offsets, offsets.sorted(), "with jittery reads and -W, some writes overtake others")
    }

    func testSequentialTargetIsWrittenInOrderEvenWhenAskedOtherwise() async throws {
        // The same jittery source that -W reorders (above), into a target that only grows.
        let size: Int64 = 4 << 20
        let src = try await makeSource(size: size, seed: 7, latency: .microseconds(200), jitter: .milliseconds(3))
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush, .sequentialWrites])
        _ = try await copy(src, dst) { $0.workers = 16; $0.bufferSize = 65536; $0.outOfOrder = true }
        XCTAssertEqual(dst.contents(), src.contents())
        let offsets = dst.operations.compactMap { $0.range?.0 }
        XCTAssertGreaterThan(offsets.count, 20)
        XCTAssertEqual(offsets, offsets.sorted(), "a .sequentialWrites target gets ascending writes even with -W")
        XCTAssertGreaterThan(src.peakInFlight, 4, "reads still ran in parallel")
    }

    func testZeroDetectionTurnsZeroDataIntoZeroRequestsOrNothing() async throws {
        let size: Int64 = 1 << 20
        let src = MemoryDevice(name: "src", size: size, capabilities: [.extents]) // reports all data
        // Data: 64 KiB of ones at 256 KiB; everything else reads zero but is "data".
        let ones = [UInt8](repeating: 1, count: 65536)
        let writable = MemoryDevice(name: "w", size: size)
        _ = writable
        let data = MemoryDevice(name: "src", size: size)
        try await data.write(at: 262144, bytes: ones)
        try await data.writeZeroes(at: 0, length: 262144, flags: []) // allocated zeros
        _ = src

        // A target that may hold old data: zero runs become zero requests.
        let dirty = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush])
        try await dirty.write(at: 0, bytes: [UInt8](repeating: 9, count: Int(size)))
        var stats = try await copy(data, dirty) { $0.bufferSize = 131072 }
        XCTAssertEqual(dirty.contents(), data.contents())
        XCTAssertEqual(stats.bytesWritten, 65536)
        XCTAssertEqual(stats.bytesZeroed, size - 65536)
        XCTAssertEqual(stats.bytesRead, 262144 + 65536, "only data extents are read")
        XCTAssertTrue(dirty.operations.contains(.zero(offset: 0, length: 131072, flags: [.mayUnmap])))

        // A target that reads as zeros: nothing but the data is sent.
        let fresh = MemoryDevice(name: "dst", size: size)
        stats = try await copy(data, fresh) { $0.bufferSize = 131072; $0.targetReadsZero = true }
        XCTAssertEqual(fresh.contents(), data.contents())
        XCTAssertEqual(fresh.operations, [.write(offset: 262144, length: 65536)])
        XCTAssertEqual(stats.bytesSkipped, size - 65536)

        // -S granularity: a 4 KiB zero run inside data is kept as data with -S 64k.
        let mixed = MemoryDevice(name: "src", size: 131072)
        var pattern = [UInt8](repeating: 5, count: 131072)
        for i in 8192 ..< 12288 { pattern[i] = 0 }
        try await mixed.write(at: 0, bytes: pattern)
        let coarse = MemoryDevice(name: "dst", size: 131072)
        stats = try await copy(mixed, coarse) { $0.sparseSize = 65536; $0.targetReadsZero = true }
        XCTAssertEqual(stats.bytesWritten, 131072)
        let fine = MemoryDevice(name: "dst", size: 131072)
        stats = try await copy(mixed, fine) { $0.sparseSize = 4096; $0.targetReadsZero = true }
        XCTAssertEqual(stats.bytesWritten, 131072 - 4096)
        XCTAssertEqual(fine.contents(), pattern)
    }

    /// Where reading a hole costs nothing, data requests read across short holes: a source of
    /// 64 KiB data runs between 64 KiB holes is read in whole buffers, not a request per run,
    /// and the target still gets data only where the source has it. Long holes, holes the zero
    /// scan could not find whole, unallocated ranges a copy leaves to a backing file, and
    /// sources that don't say holes are cheap are left as they were.
    func testShortHolesAreReadWithTheDataAroundThem() async throws {
        let run: Int64 = 64 << 10
        let size: Int64 = 4 << 20
        func source(cheap: Bool, unallocated: Bool = false) async throws -> MemoryDevice {
            var caps: BlockCapabilities = [.write, .extents]
            if cheap { caps.insert(.cheapZeroReads) }
            let d = MemoryDevice(name: "src", size: size, chunkSize: Int(run), capabilities: caps, holesAreUnallocated: unallocated)
            // 2 MiB of data and hole by turns, a 1 MiB hole, then data and hole by turns again.
            for k in stride(from: Int64(0), to: Int64(2 << 20), by: Int(2 * run)) {
                try await d.write(at: k, bytes: [UInt8](repeating: UInt8(1 + k / run % 200), count: Int(run)))
            }
            for k in stride(from: Int64(3 << 20), to: size, by: Int(2 * run)) {
                try await d.write(at: k, bytes: [UInt8](repeating: UInt8(7 + k / run % 200), count: Int(run)))
            }
            return d
        }
        let dataRuns = 16 + 8
        func readsAcrossHoles(_ src: MemoryDevice) -> Int {
            src.operations.filter { op in
                guard case .read(let o, let l) = op else { return false }
                return src.allocatedChunks.filter { $0 >= o && $0 < o + l }.count > 1
            }.count
        }
        func reads(_ src: MemoryDevice) -> Int {
            src.operations.filter { if case .read = $0 { true } else { false } }.count
        }

        for (targetReadsZero, unallocated) in [(true, false), (false, false), (true, true)] {
            let src = try await source(cheap: true, unallocated: unallocated)
            let dst = MemoryDevice(name: "dst", size: size, chunkSize: Int(run), capabilities: [.write, .zero, .extents, .flush])
            if !targetReadsZero { try await dst.write(at: 0, bytes: [UInt8](repeating: 9, count: Int(size))) }
            // 2 MiB buffers, so the first 2 MiB of short runs fit one request.
            let stats = try await copy(src, dst) { $0.targetReadsZero = targetReadsZero; $0.bufferSize = 2 << 20 }
            XCTAssertEqual(dst.contents(), src.contents())
            if targetReadsZero { XCTAssertEqual(dst.allocatedChunks, src.allocatedChunks, "holes stay holes") }
            // 0 ..< 2 MiB in one read; the 1 MiB hole is too long; 3 ..< 4 MiB in one read.
            XCTAssertEqual(reads(src), 2, "targetReadsZero \(targetReadsZero), unallocated \(unallocated)")
            XCTAssertEqual(stats.allocatedBytes, Int64(dataRuns) * run)
            XCTAssertEqual(stats.doneBytes, stats.allocatedBytes, "progress counts data, not the holes read with it")
            XCTAssertEqual(stats.bytesWritten, Int64(dataRuns) * run)
            XCTAssertGreaterThan(stats.bytesRead, stats.allocatedBytes)
            if !targetReadsZero { XCTAssertEqual(stats.bytesZeroed, size - Int64(dataRuns) * run) }
        }

        // Each of these reads every data run on its own.
        var cases: [(String, MemoryDevice, Int)] = []
        cases.append(("holes not cheap", try await source(cheap: false), 4096))
        cases.append(("holes smaller than the zero granule", try await source(cheap: true), 128 << 10))
        cases.append(("unallocated, left to a backing file", try await source(cheap: true, unallocated: true), 4096))
        for (what, src, sparse) in cases {
            let dst = MemoryDevice(name: "dst", size: size, chunkSize: Int(run))
            _ = try await copy(src, dst) {
                $0.targetReadsZero = true
                $0.sparseSize = sparse
                $0.skipUnallocated = src.holesAreUnallocated
            }
            XCTAssertEqual(dst.contents(), src.contents(), what)
            XCTAssertEqual(readsAcrossHoles(src), 0, what)
        }
        // -S 0 writes every byte: nothing to gain.
        let src = try await source(cheap: true)
        let dst = MemoryDevice(name: "dst", size: size, chunkSize: Int(run))
        _ = try await copy(src, dst) { $0.sparseSize = 0 }
        XCTAssertEqual(dst.contents(), src.contents())
        XCTAssertEqual(readsAcrossHoles(src), 0, "-S 0")
    }

    /// The writes of one request (one per data run, for a request read across holes) are in
    /// flight together on a slow target, still issued in ascending order; one of them failing
    /// fails the copy with its offset.
    func testWritesOfOneRequestGoOutTogetherInOrder() async throws {
        let run: Int64 = 64 << 10
        let size: Int64 = 2 << 20
        let src = MemoryDevice(name: "src", size: size, chunkSize: Int(run), capabilities: [.write, .extents, .cheapZeroReads])
        for k in stride(from: Int64(0), to: size, by: Int(2 * run)) {
            try await src.write(at: k, bytes: [UInt8](repeating: UInt8(1 + k / run), count: Int(run)))
        }
        let dst = MemoryDevice(name: "dst", size: size, chunkSize: Int(run), latency: .milliseconds(5))
        _ = try await copy(src, dst) { $0.workers = 1; $0.targetReadsZero = true; $0.bufferSize = Int(size) }
        XCTAssertEqual(dst.contents(), src.contents())
        XCTAssertEqual(src.operations.count { if case .read = $0 { true } else { false } }, 1, "one request")
        let offsets = dst.operations.compactMap { $0.range?.0 }
        XCTAssertEqual(offsets, stride(from: Int64(0), to: size, by: Int(2 * run)).map { $0 }, "every run, in order")
        XCTAssertGreaterThan(dst.peakInFlight, 4, "one worker, several writes in flight")

        let failing = MemoryDevice(name: "dst", size: size, chunkSize: Int(run), latency: .milliseconds(5))
        failing.failure = .init(range: 10 * run ..< 10 * run + 1, onRead: false, onWrite: true)
        do {
            _ = try await copy(src, failing) { $0.workers = 1; $0.targetReadsZero = true; $0.bufferSize = Int(size) }
            XCTFail("copy should fail")
        } catch let e as FerryError {
            XCTAssertEqual(e.path, "dst")
            XCTAssertEqual(e.offset, 10 * run)
        }
    }

    func testMemoryStaysBoundedByWorkersTimesBuffer() async throws {
        let size: Int64 = 16 << 20
        let src = try await makeSource(size: size, seed: 3, latency: .microseconds(100), jitter: .microseconds(500))
        let dst = MemoryDevice(name: "dst", size: size)
        for workers in [1, 5, 32] {
            let pool = BufferPool(bufferSize: 65536, capacity: workers)
            var c = CopyConfiguration()
            c.workers = workers
            c.bufferSize = 65536
            c.outOfOrder = workers == 32
            _ = try await CopyEngine.copy(from: src, to: dst, configuration: c, pool: pool)
            XCTAssertLessThanOrEqual(pool.peakAllocated, workers)
            XCTAssertGreaterThanOrEqual(pool.peakAllocated, 1)
            XCTAssertEqual(dst.contents(), src.contents())
        }
        XCTAssertLessThanOrEqual(src.peakInFlight, 32)
    }

    func testHugeSparseSourceIsPlannedByExtentsNotBytes() async throws {
        let size: Int64 = 1 << 40 // 1 TiB
        let src = MemoryDevice(name: "src", size: size, chunkSize: 1 << 20)
        let ones = [UInt8](repeating: 0xAB, count: 3 << 20)
        try await src.write(at: size / 2, bytes: ones)
        let dst = MemoryDevice(name: "dst", size: size, chunkSize: 1 << 20)
        let stats = try await copy(src, dst) { $0.targetReadsZero = true }
        XCTAssertEqual(stats.bytesRead, 3 << 20)
        XCTAssertEqual(stats.bytesWritten, 3 << 20)
        XCTAssertEqual(stats.allocatedBytes, 3 << 20)
        let base: Int64 = size / 2
        XCTAssertEqual(dst.allocatedChunks, [base, base + (1 << 20), base + (2 << 20)])
    }

    func testAlignmentIsKeptWhenExtentsAreFinerThanTheTarget() async throws {
        // Source extents at 512-byte granularity; target demands 4096-byte alignment.
        let size: Int64 = 256 * 1024 + 1536
        let src = MemoryDevice(name: "src", size: size, chunkSize: 512)
        var rng = SplitMix(seed: 9)
        for i in stride(from: Int64(0), to: size, by: 512) where rng.next() % 3 == 0 {
            let b = [UInt8](repeating: UInt8(1 + i / 512 % 250), count: 512)
            try await src.write(at: i, bytes: b)
        }
        let dst = MemoryDevice(name: "dst", size: size, chunkSize: 512,
                               limits: BlockLimits(alignment: 4096, preferredTransfer: 65536, maximumTransfer: 1 << 20),
                               capabilities: [.write, .zero, .extents, .flush])
        _ = try await copy(src, dst) { $0.bufferSize = 65536; $0.sparseSize = 512 }
        XCTAssertEqual(dst.contents(), src.contents())
    }

    func testFirstErrorStopsTheCopyAndNamesImageAndOffset() async throws {
        let size: Int64 = 8 << 20
        for outOfOrder in [false, true] {
            let src = try await makeSource(size: size, seed: 11, latency: .microseconds(100))
            // Make sure the failing range holds data so it is really read.
            let junk = [UInt8](repeating: 3, count: 65536)
            try await src.write(at: 5 << 20, bytes: junk)
            src.failure = .init(range: (5 << 20) ..< (5 << 20) + 1, onRead: true, onWrite: false)
            let dst = MemoryDevice(name: "dst", size: size)
            do {
                _ = try await copy(src, dst) { $0.workers = 8; $0.bufferSize = 65536; $0.outOfOrder = outOfOrder }
                XCTFail("copy should fail")
            } catch let e as FerryError {
                XCTAssertEqual(e.code, .io)
                XCTAssertEqual(e.path, "src")
                // The failed request is the one that holds the bad byte.
                let at = try XCTUnwrap(e.offset)
                XCTAssertLessThanOrEqual(at, 5 << 20)
                XCTAssertGreaterThan(at + 65536, 5 << 20)
                XCTAssertEqual(e.description, "src: injected I/O error at offset \(at)")
            }
            // Nothing at or past the failed request was written in order mode.
            if !outOfOrder {
                for op in dst.operations {
                    if let (o, _) = op.range { XCTAssertLessThan(o, 5 << 20) }
                }
            }
        }
        // A failing target is named too.
        let src = try await makeSource(size: size, seed: 12)
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents])
        dst.failure = .init(range: 0 ..< size, onRead: false, onWrite: true)
        do {
            _ = try await copy(src, dst)
            XCTFail("copy should fail")
        } catch let e as FerryError {
            XCTAssertEqual(e.path, "dst")
            XCTAssertNotNil(e.offset)
        }
    }

    /// Zero runs need no buffer: their writes complete behind the workers, so a slow target
    /// gets more requests at once than there are workers, still issued in order.
    func testZeroWritesRunBehindTheirWorkers() async throws {
        let size: Int64 = 4 << 20
        let src = MemoryDevice(name: "src", size: size, chunkSize: 65536)
        for k in stride(from: Int64(0), to: size, by: 131072) {
            try await src.write(at: k, bytes: [UInt8](repeating: UInt8(truncatingIfNeeded: k >> 17) | 1, count: 65536))
        }
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush],
                               latency: .milliseconds(3), jitter: .milliseconds(2))
        try await dst.write(at: 0, bytes: [UInt8](repeating: 0xee, count: Int(size)))
        let stats = try await copy(src, dst) { $0.workers = 2; $0.bufferSize = 65536 }
        XCTAssertEqual(dst.contents(), src.contents())
        XCTAssertEqual(stats.bytesZeroed, size / 2)
        var last: Int64 = -1
        for op in dst.operations {
            guard let (o, l) = op.range, o >= 0 else { continue }
            if case .write(let o, _) = op, o == 0, l == size { continue }   // the 0xee fill
            XCTAssertGreaterThanOrEqual(o, last, "request at \(o) was issued after one ending at \(last)")
            last = o + l
        }
        XCTAssertGreaterThan(dst.peakInFlight, 2, "two workers, more than two requests in flight")
    }

    /// A zero write that fails behind its worker stops the copy with its own error.
    func testFailedZeroWriteStopsTheCopyWithItsError() async throws {
        let size: Int64 = 4 << 20
        let src = MemoryDevice(name: "src", size: size, chunkSize: 65536)
        for k in stride(from: Int64(0), to: size, by: 131072) {
            try await src.write(at: k, bytes: [UInt8](repeating: 7, count: 65536))
        }
        for outOfOrder in [false, true] {
            let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush],
                                   latency: .microseconds(200))
            // The hole at 1 MiB + 64 KiB fails.
            dst.failure = .init(range: (1 << 20) + 65536 ..< (1 << 20) + 65537, onRead: false, onWrite: true)
            do {
                _ = try await copy(src, dst) { $0.workers = 4; $0.bufferSize = 65536; $0.outOfOrder = outOfOrder }
                XCTFail("copy should fail")
            } catch let e as FerryError {
                XCTAssertEqual(e.code, .io, "\(e)")
                XCTAssertEqual(e.path, "dst")
                XCTAssertEqual(e.offset, (1 << 20) + 65536)
            }
        }
        // Refused before it was issued (a read-only target), so its turn never passes: the
        // workers waiting behind it must stop, not wait for ever.
        let holeFirst = MemoryDevice(name: "src", size: size, chunkSize: 65536)
        for k in stride(from: Int64(65536), to: size, by: 131072) {
            try await holeFirst.write(at: k, bytes: [UInt8](repeating: 7, count: 65536))
        }
        let readOnly = MemoryDevice(name: "ro", size: size, capabilities: [.extents])
        do {
            _ = try await copy(holeFirst, readOnly) { $0.workers = 4; $0.bufferSize = 65536 }
            XCTFail("copy should fail")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .readOnly, "\(e)")
            XCTAssertEqual(e.path, "ro")
        }
    }

    func testCancellationStopsWorkersAndSaysWhere() async throws {
        let size: Int64 = 64 << 20
        // No extents: every byte is read, slowly.
        let src = MemoryDevice(name: "src", size: size, capabilities: [], latency: .milliseconds(20))
        let dst = MemoryDevice(name: "dst", size: size)
        var config = CopyConfiguration()
        config.workers = 4
        config.bufferSize = 65536
        let task = Task { [config] in try await CopyEngine.copy(from: src, to: dst, configuration: config) }
        try await Task.sleep(for: .milliseconds(150))
        task.cancel()
        do {
            _ = try await task.value
            XCTFail("a cancelled copy must not succeed")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .cancelled)
            let at = try XCTUnwrap(e.offset)
            XCTAssertGreaterThan(at, 0)
            XCTAssertLessThan(at, size)
            XCTAssertTrue(e.message.contains("before offset \(at)"), e.message)
        }
        let after = src.operations.count
        try await Task.sleep(for: .milliseconds(100))
        XCTAssertEqual(src.operations.count, after, "no worker keeps going after cancellation")
    }

    func testConcatenatedSources() async throws {
        let a = try await makeSource(size: 100 * 1024, chunk: 1024, seed: 1, name: "a")
        let b = try await makeSource(size: 3 * 4096 + 512, chunk: 512, seed: 2, name: "b")
        let c = try await makeSource(size: 1 << 20, seed: 3, name: "c")
        let src = ConcatDevice([a, b, c])
        XCTAssertEqual(src.size, a.size + b.size + c.size)
        let dst = MemoryDevice(name: "dst", size: src.size)
        var config = CopyConfiguration()
        config.bufferSize = 65536
        config.targetReadsZero = true
        _ = try await CopyEngine.copy(from: src, to: dst, configuration: config)
        let expected: [UInt8] = a.contents() + b.contents() + c.contents()
        XCTAssertEqual(dst.contents(), expected)
    }

    func testProgressReportsReachTheTotal() async throws {
        let src = try await makeSource(size: 4 << 20, seed: 5)
        let dst = MemoryDevice(name: "dst", size: 4 << 20)
        let seen = Reports()
        var c = CopyConfiguration()
        c.bufferSize = 65536
        c.progressInterval = 0
        let stats = try await CopyEngine.copy(from: src, to: dst, configuration: c) { seen.add($0) }
        let all = seen.all
        XCTAssertGreaterThan(all.count, 2)
        XCTAssertEqual(all.last, stats)
        XCTAssertEqual(stats.doneBytes, stats.allocatedBytes)
        XCTAssertEqual(stats.fraction, 1)
        for (x, y) in zip(all, all.dropFirst()) { XCTAssertLessThanOrEqual(x.doneBytes, y.doneBytes) }
    }

    /// The planner asks for its first extents as soon as it is told to prefetch (the engine
    /// does, before it counts the data), and the first request comes from that answer.
    func testPlannerPrefetchAsksAheadOnce() async throws {
        let memory = MemoryDevice(name: "src", size: 4 << 20)
        try await memory.write(at: 1 << 20, bytes: [UInt8](repeating: 7, count: 65536))
        let source = ExtentCountingDevice(memory)
        let planner = Planner(source: source, alignment: 512, maxData: 1 << 20)
        await planner.prefetch()
        let deadline = Date().addingTimeInterval(10)
        while source.queries.withLock({ $0 }) == 0 && Date() < deadline { try await Task.sleep(nanoseconds: 1_000_000) }
        XCTAssertEqual(source.queries.withLock { $0 }, 1, "asked ahead")
        await planner.prefetch()
        let first = try await planner.next()
        XCTAssertEqual(first?.offset, 0)
        XCTAssertEqual(first?.kind, .zero)
        XCTAssertEqual(first?.length, 1 << 20)
        let second = try await planner.next()
        XCTAssertEqual(second?.kind, .data)
        XCTAssertEqual(source.queries.withLock { $0 }, 1, "the requests came from the answer fetched ahead")
    }

    /// The data is counted beside the copy, not before it: with a source whose block status
    /// takes 100 ms a call and answers at most 4,096 extents of its 12,288, the planner
    /// starts from the first answer while the count needs three (before, the first read
    /// waited for all three). Progress waits for the count: every report has the total.
    func testCopyStartsBeforeTheDataIsCounted() async throws {
        let memory = MemoryDevice(name: "src", size: 48 << 20)
        for k in stride(from: Int64(0), to: 48 << 20, by: 8192) {
            try await memory.write(at: k, bytes: [UInt8](repeating: UInt8(truncatingIfNeeded: k >> 13 | 1), count: 4096))
        }
        let source = SlowExtentsDevice(memory)
        let dst = MemoryDevice(name: "dst", size: 48 << 20)
        let seen = Reports()
        let counted = Locked<UInt64?>(nil)
        var c = CopyConfiguration()
        c.progressInterval = 0
        let stats = try await CopyEngine.copy(from: source, to: dst, configuration: c) { s in
            counted.withLock { $0 = $0 ?? monotonicNanoseconds() }
            seen.add(s)
        }
        XCTAssertEqual(dst.contents(), memory.contents())
        XCTAssertEqual(stats.allocatedBytes, 24 << 20)
        XCTAssertTrue(seen.all.allSatisfy { $0.allocatedBytes == 24 << 20 }, "a report came before the count")
        let firstRead = try XCTUnwrap(source.firstRead.withLock { $0 })
        let firstReport = try XCTUnwrap(counted.withLock { $0 })
        XCTAssertLessThan(firstRead + 100_000_000, firstReport, "the copy waited for the count")
    }

    /// When the planner's first answer maps the whole source, the count takes its total from
    /// that answer: the copy asks the source for its extents once, and every report has the
    /// total. A source whose first answer stops short is still counted by a walk of its own.
    func testCountUsesThePlannersAnswerWhenItMapsTheWholeSource() async throws {
        let memory = MemoryDevice(name: "src", size: 64 << 20)
        for k in stride(from: Int64(0), to: 64 << 20, by: 4 << 20) {
            try await memory.write(at: k + 65536, bytes: [UInt8](repeating: UInt8(truncatingIfNeeded: k >> 22 | 1), count: 65536))
        }
        let source = ExtentCountingDevice(memory)
        let dst = MemoryDevice(name: "dst", size: 64 << 20)
        let seen = Reports()
        var c = CopyConfiguration()
        c.progressInterval = 0
        let stats = try await CopyEngine.copy(from: source, to: dst, configuration: c) { seen.add($0) }
        XCTAssertEqual(dst.contents(), memory.contents())
        XCTAssertEqual(source.queries.withLock { $0 }, 1, "the count asked again")
        XCTAssertEqual(stats.allocatedBytes, 16 * 65536)
        XCTAssertFalse(seen.all.isEmpty)
        XCTAssertTrue(seen.all.allSatisfy { $0.allocatedBytes == 16 * 65536 }, "a report without the total")

        // 12,288 extents, at most 4,096 an answer: the planner's first answer is partial.
        let many = MemoryDevice(name: "many", size: 48 << 20)
        for k in stride(from: Int64(0), to: 48 << 20, by: 8192) {
            try await many.write(at: k, bytes: [UInt8](repeating: 1, count: 4096))
        }
        let slow = SlowExtentsDevice(many)
        let stats2 = try await CopyEngine.copy(from: slow, to: MemoryDevice(name: "dst2", size: 48 << 20), configuration: c)
        XCTAssertEqual(stats2.allocatedBytes, 24 << 20)
    }

    /// A count that fails does not fail the copy (the planner's own questions are answered),
    /// and the final report's total is the data copied, not the image's size: 100%.
    func testCopySucceedsWhenOnlyTheCountFails() async throws {
        let size: Int64 = 3 << 29 // past the planner's 1 GiB window, so the count alone asks for all of it
        let memory = MemoryDevice(name: "src", size: size)
        let offsets: [Int64] = [0, 700 << 20, size - 65536]
        for (i, o) in offsets.enumerated() { try await memory.write(at: o, bytes: [UInt8](repeating: UInt8(i + 1), count: 65536)) }
        let source = WholeRangeFailingDevice(memory)
        let dst = MemoryDevice(name: "dst", size: size)
        let seen = Reports()
        var c = CopyConfiguration()
        c.progressInterval = 0
        let stats = try await CopyEngine.copy(from: source, to: dst, configuration: c) { seen.add($0) }
        XCTAssertGreaterThan(source.refused.withLock { $0 }, 0, "the count asked for the whole image")
        for (i, o) in offsets.enumerated() {
            let back = try await dst.read(at: o, count: 65536)
            XCTAssertEqual(back, [UInt8](repeating: UInt8(i + 1), count: 65536), "offset \(o)")
        }
        XCTAssertEqual(stats.doneBytes, 3 * 65536)
        XCTAssertEqual(stats.allocatedBytes, stats.doneBytes)
        XCTAssertEqual(seen.all.last?.fraction, 1)
    }

    func testTargetSmallerThanSourceIsRefused() async throws {
        let src = MemoryDevice(name: "src", size: 8192)
        let dst = MemoryDevice(name: "dst", size: 4096)
        do {
            _ = try await copy(src, dst)
            XCTFail("should refuse")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .tooSmall)
        }
    }
}

final class Reports: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [CopyStats] = []
    func add(_ s: CopyStats) { lock.lock(); items.append(s); lock.unlock() }
    var all: [CopyStats] { lock.lock(); defer { lock.unlock() }; return items }
}

/// A small deterministic generator, so failures reproduce.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A source whose block status takes 100 ms and answers at most 4,096 extents (as a server
/// may: the caller asks again for the rest).
final class SlowExtentsDevice: BlockDevice, @unchecked Sendable {
    let inner: MemoryDevice
    let firstRead = Locked<UInt64?>(nil)
    init(_ inner: MemoryDevice) { self.inner = inner }
    var name: String { inner.name }
    var size: Int64 { inner.size }
    var limits: BlockLimits { inner.limits }
    var capabilities: BlockCapabilities { inner.capabilities }
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        firstRead.withLock { $0 = $0 ?? monotonicNanoseconds() }
        try await inner.read(at: offset, into: buffer)
    }
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws { try await inner.write(at: offset, from: buffer, flags: flags) }
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws { try await inner.writeZeroes(at: offset, length: length, flags: flags) }
    func discard(at offset: Int64, length: Int64) async throws { try await inner.discard(at: offset, length: length) }
    func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await Task.sleep(nanoseconds: 100_000_000)
        return Array(try await inner.extents(in: range).prefix(4096))
    }
    func flush() async throws {}
    func close() async throws {}
}

/// A source that refuses block status for the whole image at once (what the count asks) and
/// answers any smaller range.
final class WholeRangeFailingDevice: BlockDevice, @unchecked Sendable {
    let inner: MemoryDevice
    let refused = Locked(0)
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
        if range == 0 ..< size {
            refused.withLock { $0 += 1 }
            throw FerryError(.io, "block status refused", path: name, offset: 0)
        }
        return try await inner.extents(in: range)
    }
    func flush() async throws {}
    func close() async throws {}
}
