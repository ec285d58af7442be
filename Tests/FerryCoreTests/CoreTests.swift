import XCTest
@testable import FerryCore

final class ZeroScanTests: XCTestCase {
    func testIsZeroFindsASingleByteAnywhere() {
        let buffer = AlignedBuffer(count: 8192 + 13)
        buffer.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        // Every length and start offset around the word and block boundaries.
        for start in [0, 1, 7, 8, 63, 64, 65] {
            for length in [0, 1, 7, 8, 9, 63, 64, 65, 511, 4096, 8192] where start + length <= buffer.count {
                let slice = UnsafeRawBufferPointer(rebasing: buffer.bytes[start ..< start + length])
                XCTAssertTrue(ZeroScan.isZero(slice))
                for poke in [0, length / 2, length - 1] where length > 0 {
                    buffer.base.storeBytes(of: 1, toByteOffset: start + poke, as: UInt8.self)
                    XCTAssertFalse(ZeroScan.isZero(slice), "start \(start) length \(length) poke \(poke)")
                    buffer.base.storeBytes(of: 0, toByteOffset: start + poke, as: UInt8.self)
                }
            }
        }
    }

    func testRunsFollowAbsoluteGranules() {
        var bytes = [UInt8](repeating: 0, count: 10000)
        bytes[5000] = 1
        bytes.withUnsafeBytes { raw in
            // Buffer holds device bytes 1000 ..< 11000; granules of 4096 from absolute 0.
            let runs = ZeroScan.runs(in: raw, at: 1000, granularity: 4096)
            // Granules: [1000,4096) zero, [4096,8192) has byte 6000 -> data, [8192,11000) zero.
            XCTAssertEqual(runs, [
                .init(range: 0 ..< 3096, isZero: true),
                .init(range: 3096 ..< 7192, isZero: false),
                .init(range: 7192 ..< 10000, isZero: true),
            ])
            XCTAssertEqual(ZeroScan.runs(in: raw, at: 0, granularity: 65536), [.init(range: 0 ..< 10000, isZero: false)])
        }
    }
}

final class ByteSizeTests: XCTestCase {
    func testParse() {
        XCTAssertEqual(ByteSize.parse("4096"), 4096)
        XCTAssertEqual(ByteSize.parse("4k"), 4096)
        XCTAssertEqual(ByteSize.parse("2M"), 2 << 20)
        XCTAssertEqual(ByteSize.parse("1.5G"), 3 << 29)
        XCTAssertEqual(ByteSize.parse("1T"), 1 << 40)
        XCTAssertEqual(ByteSize.parse("512b"), 512)
        for bad in ["", "k", "-1", "1x", "abc", "1.5", "1e3", "99999999E"] {
            XCTAssertNil(ByteSize.parse(bad), bad)
        }
    }

    func testHumanMatchesQemuStyle() {
        XCTAssertEqual(ByteSize.human(512), "512 B")
        XCTAssertEqual(ByteSize.human(69632), "68 KiB")
        XCTAssertEqual(ByteSize.human(1 << 30), "1 GiB")
        XCTAssertEqual(ByteSize.human(3 << 29), "1.5 GiB")
        XCTAssertEqual(ByteSize.human(1_048_576 * 15 + 300_000), "15.3 MiB")
        XCTAssertEqual(ByteSize.human(1 << 40), "1 TiB")
        // The unit changes at 1000, as qemu's size_to_str.
        XCTAssertEqual(ByteSize.human(102_912), "100 KiB")
        XCTAssertEqual(ByteSize.human(1_047_552), "0.999 MiB")
        XCTAssertEqual(ByteSize.human(0), "0 B")
    }
}

final class ExtentTests: XCTestCase {
    func testCoalesceJoinsNeighboursOfOneKind() {
        let e = [Extent(offset: 0, length: 10, kind: .data), Extent(offset: 10, length: 5, kind: .data),
                 Extent(offset: 15, length: 0, kind: .zero), Extent(offset: 15, length: 5, kind: .zero),
                 Extent(offset: 20, length: 5, kind: .unallocated)]
        XCTAssertEqual(e.coalesced(), [Extent(offset: 0, length: 15, kind: .data), Extent(offset: 15, length: 5, kind: .zero),
                                       Extent(offset: 20, length: 5, kind: .unallocated)])
    }
}

final class BufferPoolTests: XCTestCase {
    func testPoolNeverExceedsCapacityAndWakesWaiters() async {
        let pool = BufferPool(bufferSize: 4096, capacity: 3)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0 ..< 20 {
                group.addTask {
                    let b = await pool.take()
                    XCTAssertEqual(Int(bitPattern: b.base) % AlignedBuffer.alignment, 0)
                    try? await Task.sleep(for: .milliseconds(2))
                    pool.give(b)
                }
            }
        }
        XCTAssertEqual(pool.peakAllocated, 3)
    }
}

final class MemoryDeviceTests: XCTestCase {
    func testReadWriteZeroDiscardAndExtents() async throws {
        let dev = MemoryDevice(size: 10 * 4096 + 100)
        try await dev.write(at: 4000, bytes: [UInt8](repeating: 7, count: 200))
        let got1 = try await dev.read(at: 3999, count: 202)
        XCTAssertEqual(got1, [0] + [UInt8](repeating: 7, count: 200) + [0])
        let got2 = try await dev.extents(in: 0 ..< dev.size)
        XCTAssertEqual(got2, [
            Extent(offset: 0, length: 8192, kind: .data), Extent(offset: 8192, length: dev.size - 8192, kind: .zero),
        ])
        try await dev.writeZeroes(at: 4096, length: 4096, flags: [.mayUnmap])
        XCTAssertEqual(dev.allocatedChunks, [0])
        let got3 = try await dev.read(at: 4000, count: 96)
        XCTAssertEqual(got3, [UInt8](repeating: 7, count: 96))
        try await dev.writeZeroes(at: 20000, length: 5000, flags: [])
        XCTAssertEqual(dev.allocatedChunks, [0, 16384, 20480, 24576])
        // The tail chunk is shorter than the others.
        try await dev.write(at: dev.size - 1, bytes: [9])
        let tail = try await dev.extents(in: dev.size - 50 ..< dev.size)
        XCTAssertEqual(tail, [Extent(offset: dev.size - 50, length: 50, kind: .data)])
    }

    func testAlignmentIsEnforcedExceptAtTheEnd() async throws {
        let dev = MemoryDevice(size: 4096 * 2 + 512, limits: BlockLimits(alignment: 4096))
        try await dev.write(at: 4096, bytes: [UInt8](repeating: 1, count: 4096))
        try await dev.write(at: 8192, bytes: [UInt8](repeating: 1, count: 512))
        do {
            try await dev.write(at: 100, bytes: [1])
            XCTFail("unaligned write accepted")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .invalidArgument)
        }
    }
}

final class ConcatDeviceTests: XCTestCase {
    func testExtentsAndReadsSpanParts() async throws {
        let a = MemoryDevice(name: "a", size: 6000)
        let b = MemoryDevice(name: "b", size: 0)
        let c = MemoryDevice(name: "c", size: 5000)
        try await a.write(at: 5000, bytes: [UInt8](repeating: 1, count: 1000))
        try await c.write(at: 0, bytes: [UInt8](repeating: 2, count: 10))
        let cat = ConcatDevice([a, b, c])
        XCTAssertEqual(cat.size, 11000)
        let got4 = try await cat.read(at: 5990, count: 20)
        XCTAssertEqual(got4, [UInt8](repeating: 1, count: 10) + [UInt8](repeating: 2, count: 10))
        var seen: [Extent] = []
        try await cat.forEachExtent(in: 0 ..< cat.size) { seen.append($0) }
        XCTAssertEqual(seen.coalesced(), [
            Extent(offset: 0, length: 4096, kind: .zero), Extent(offset: 4096, length: 1904 + 4096, kind: .data),
            Extent(offset: 10096, length: 904, kind: .zero),
        ])
        a.failure = .init(range: 0 ..< 6000)
        do {
            _ = try await cat.read(at: 0, count: 10)
            XCTFail("error expected")
        } catch let e as FerryError {
            XCTAssertEqual(e.path, "a", "errors name the part, not the concatenation")
        }
    }
}
