import XCTest
import FerryCore
@testable import FerryConvert

/// The depth a copy finds by itself, the cap on bytes in flight, and who decides the order
/// of writes.
final class DepthTests: XCTestCase {
    func dataSource(size: Int64, latency: Duration? = nil, jitter: Duration? = nil) async throws -> MemoryDevice {
        let dev = MemoryDevice(name: "src", size: size, chunkSize: 4096,
                               limits: BlockLimits(alignment: 1, preferredTransfer: 65536, maximumTransfer: 1 << 20),
                               latency: latency, jitter: jitter)
        var rng = SplitMix(seed: UInt64(size))
        try await dev.write(at: 0, bytes: (0 ..< Int(size)).map { _ in UInt8(truncatingIfNeeded: rng.next() | 1) })
        return dev
    }

    func testClimberDoublesWhileThroughputFollowsAndStopsWhereItFlattens() {
        // Throughput proportional to depth up to 24, flat after.
        func rate(_ d: Int) -> Double { Double(min(d, 24)) * 100 }
        var c = DepthClimber(start: 8, maximum: 64)
        var depth = 8
        var seen: [Int] = []
        for _ in 0 ..< 6 {
            depth = c.next(rate: rate(depth))
            seen.append(depth)
        }
        // 8 -> 16 (gain) -> 32 (gain: 24 against 16) -> 64 (no gain: back to 32) and held.
        XCTAssertEqual(seen, [16, 32, 64, 32, 32, 32])
    }

    func testClimberGoesBackWhenMoreDepthGainsNothing() {
        var c = DepthClimber(start: 8, maximum: 64, holdWindows: 2)
        XCTAssertEqual(c.next(rate: 1000), 16)
        XCTAssertEqual(c.next(rate: 1020), 8, "2% is no gain")
        XCTAssertEqual(c.next(rate: 1000), 8)
        XCTAssertEqual(c.next(rate: 1000), 8)
        XCTAssertEqual(c.next(rate: 1000), 16, "tried again after the hold")
    }

    func testPlanCapsDepthByBytesInFlight() {
        let given = DepthPlan(workers: 1024, bufferSize: 2 << 20, maxInFlight: 128 << 20)
        XCTAssertEqual(given.initial, 64)
        XCTAssertFalse(given.adaptive)
        let found = DepthPlan(workers: nil, bufferSize: 2 << 20, maxInFlight: 128 << 20)
        XCTAssertEqual([found.initial, found.workers], [16, 64])
        XCTAssertTrue(found.adaptive)
        let small = DepthPlan(workers: nil, bufferSize: 2 << 20, maxInFlight: 8 << 20)
        XCTAssertEqual([small.initial, small.workers], [4, 4])
        XCTAssertFalse(small.adaptive)
        // Endpoints that serve more at once (four NBD connections of 16) start that deep,
        // within the memory cap; a given -m still wins.
        let wide = DepthPlan(workers: nil, bufferSize: 2 << 20, maxInFlight: 128 << 20, concurrency: 64)
        XCTAssertEqual([wide.initial, wide.workers], [64, 64])
        XCTAssertEqual(DepthPlan(workers: nil, bufferSize: 2 << 20, maxInFlight: 128 << 20, concurrency: 32).initial, 32)
        XCTAssertEqual(DepthPlan(workers: nil, bufferSize: 2 << 20, maxInFlight: 32 << 20, concurrency: 64).initial, 16)
        XCTAssertEqual(DepthPlan(workers: 8, bufferSize: 2 << 20, maxInFlight: 128 << 20, concurrency: 64).initial, 8)
    }

    /// Without -m and --buffer-size, the starting depth's buffers hold at most the window:
    /// 1 MiB at the 16 a local copy starts at, 512 KiB at four NBD connections' 64, never
    /// under 256 KiB, the alignment or the zero-detection granule.
    func testBufferSizeFitsTheStartingDepth() {
        func fit(_ concurrency: Int, window: Int = 32 << 20, alignment: Int = 512, atLeast: Int = 4096) -> Int {
            DepthPlan.fittedBufferSize(1 << 20, window: window, concurrency: concurrency, alignment: alignment, atLeast: atLeast)
        }
        XCTAssertEqual(fit(1), 1 << 20)
        XCTAssertEqual(fit(32), 1 << 20)
        XCTAssertEqual(fit(64), 512 << 10)
        XCTAssertEqual(fit(1024), 256 << 10)
        XCTAssertEqual(fit(64, window: 1 << 20), 256 << 10)
        XCTAssertEqual(fit(64, atLeast: 768 << 10), 768 << 10)
        XCTAssertEqual(fit(48, alignment: 192 << 10), 576 << 10, "a multiple of the alignment")
    }

    /// A source 4 ms away: sixteen 64 KiB requests in flight leave it idle most of the time,
    /// and the copy finds that more depth pays.
    func testAdaptiveCopyGoesDeeperOnASlowSource() async throws {
        let size: Int64 = 48 << 20
        let src = try await dataSource(size: size, latency: .milliseconds(4))
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush, .anyWriteOrder])
        var c = CopyConfiguration()
        c.bufferSize = 65536
        c.depthWindow = 0.05
        let stats = try await CopyEngine.copy(from: src, to: dst, configuration: c)
        XCTAssertEqual(dst.contents(), src.contents())
        XCTAssertGreaterThan(stats.peakDepth, 16, "the depth rose from its start")
        XCTAssertGreaterThan(src.peakInFlight, 16, "and more requests were in flight")
        XCTAssertLessThanOrEqual(src.peakInFlight, 64)
        XCTAssertEqual(stats.maxInFlight, 128 << 20)
    }

    func testGivenDepthIsKept() async throws {
        let size: Int64 = 8 << 20
        let src = try await dataSource(size: size, latency: .milliseconds(2))
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush, .anyWriteOrder])
        var c = CopyConfiguration()
        c.bufferSize = 65536
        c.workers = 3
        c.depthWindow = 0.02
        let stats = try await CopyEngine.copy(from: src, to: dst, configuration: c)
        XCTAssertEqual(dst.contents(), src.contents())
        XCTAssertEqual(stats.peakDepth, 3)
        XCTAssertLessThanOrEqual(src.peakInFlight, 3)
    }

    /// `-m 1024` with a cap of 1 MiB of 64 KiB buffers: 16 buffers, 16 reads in flight.
    func testBytesInFlightCapBoundsAHugeDepth() async throws {
        let size: Int64 = 8 << 20
        let src = try await dataSource(size: size, latency: .microseconds(300), jitter: .microseconds(500))
        let dst = MemoryDevice(name: "dst", size: size, capabilities: [.write, .zero, .extents, .flush, .anyWriteOrder])
        let pool = BufferPool(bufferSize: 65536, capacity: 1024)
        var c = CopyConfiguration()
        c.bufferSize = 65536
        c.workers = 1024
        c.maxInFlight = 1 << 20
        let stats = try await CopyEngine.copy(from: src, to: dst, configuration: c, pool: pool)
        XCTAssertEqual(dst.contents(), src.contents())
        XCTAssertLessThanOrEqual(pool.peakAllocated, 16)
        XCTAssertLessThanOrEqual(src.peakInFlight, 16)
        XCTAssertGreaterThan(src.peakInFlight, 4)
        XCTAssertEqual(stats.depth, 16)
    }

    /// Without -W or --in-order the target decides: a target that says `.anyWriteOrder`
    /// gets writes as they are ready, one that does not gets them in guest order.
    func testTargetDecidesTheOrderOfWritesByDefault() async throws {
        let size: Int64 = 4 << 20
        let src = try await dataSource(size: size, latency: .microseconds(200), jitter: .milliseconds(3))
        for (caps, ordered) in [([BlockCapabilities.anyWriteOrder], false), ([], true)] {
            for forced in [nil, false] as [Bool?] {
                let dst = MemoryDevice(name: "dst", size: size, capabilities: BlockCapabilities([.write, .zero, .extents, .flush]).union(BlockCapabilities(caps)))
                var c = CopyConfiguration()
                c.workers = 16
                c.bufferSize = 65536
                c.outOfOrder = forced
                _ = try await CopyEngine.copy(from: src, to: dst, configuration: c)
                XCTAssertEqual(dst.contents(), src.contents())
                let offsets = dst.operations.compactMap { $0.range?.0 }
                XCTAssertGreaterThan(offsets.count, 20)
                if ordered || forced == false {
                    XCTAssertEqual(offsets, offsets.sorted(), "in order: caps \(caps), asked \(String(describing: forced))")
                } else {
                    XCTAssertNotEqual(offsets, offsets.sorted(), "a target that does not care gets writes as they are ready")
                }
            }
        }
    }
}
