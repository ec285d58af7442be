import XCTest
import FerryCore
@testable import FerryConvert

/// `ImageCompare` against in-memory devices: the first difference by offset, whatever the
/// order the requests in flight complete in; holes never read.
final class CompareTests: XCTestCase {
    /// Two devices with the same random data and holes (the second with a different allocation
    /// of its zeros), then one byte changed at `change` in the second.
    func pair(size: Int64, seed: UInt64, change: Int64?, alignment: Int = 1) async throws -> (MemoryDevice, MemoryDevice) {
        let limits = BlockLimits(alignment: alignment, preferredTransfer: 65536, maximumTransfer: 256 << 10)
        let a = MemoryDevice(name: "a", size: size, limits: limits, latency: .microseconds(200), jitter: .microseconds(400))
        let b = MemoryDevice(name: "b", size: size, limits: limits, latency: .microseconds(200), jitter: .microseconds(400))
        var rng = SplitMix(seed: seed)
        var pos: Int64 = 0
        while pos < size {
            let n = min(Int64(1 + rng.next() % 64) * 4096, size - pos)
            switch rng.next() % 3 {
            case 0:
                var bytes = [UInt8](repeating: 0, count: Int(n))
                for i in bytes.indices where i % 5 != 0 { bytes[i] = UInt8(truncatingIfNeeded: rng.next()) }
                try await a.write(at: pos, bytes: bytes)
                try await b.write(at: pos, bytes: bytes)
            case 1:
                // Zeros as data in one, a hole in the other.
                try await a.write(at: pos, bytes: [UInt8](repeating: 0, count: Int(n)))
            default:
                break
            }
            pos += n
        }
        if let change {
            // Read and written as the aligned block holding the byte.
            let block = change / Int64(alignment) * Int64(alignment)
            let buffer = AlignedBuffer(count: alignment)
            try await b.read(at: block, into: buffer.mutableBytes)
            var bytes = Array(buffer.bytes)
            bytes[Int(change - block)] ^= 0x5a
            try await b.write(at: block, bytes: bytes)
        }
        return (a, b)
    }

    func testFirstDifferenceWhateverTheCompletionOrder() async throws {
        for seed in UInt64(1) ... 6 {
            var rng = SplitMix(seed: seed &* 77)
            let size = Int64(8 << 20)
            let change = Int64(rng.next() % UInt64(size))
            let (a, b) = try await pair(size: size, seed: seed, change: change)
            // A second, later change must not hide the first.
            if change + 3 << 20 < size { try await b.write(at: change + 3 << 20, bytes: [0xff]) }
            var options = CompareOptions()
            options.workers = 16
            options.chunkSize = 64 << 10
            let r = try await ImageCompare.compare(a, b, options: options)
            XCTAssertEqual(r.verdict, .contentMismatch(offset: change / 512 * 512), "seed \(seed)")
            XCTAssertGreaterThan(a.peakInFlight, 1, "requests were not in flight together")
        }
    }

    func testIdenticalDataReadsOnlyWhereEitherHasData() async throws {
        let (a, b) = try await pair(size: 4 << 20, seed: 9, change: nil)
        let r = try await ImageCompare.compare(a, b)
        XCTAssertEqual(r.verdict, .identical)
        // Strict: the zeros written as data in one are holes in the other.
        var strict = CompareOptions()
        strict.strict = true
        let s = try await ImageCompare.compare(a, b, options: strict)
        guard case .blockStatusMismatch = s.verdict else { return XCTFail("strict compare gave \(s.verdict)") }
        // Two empty devices: nothing at all is read.
        let e1 = MemoryDevice(name: "e1", size: 64 << 30, chunkSize: 1 << 20), e2 = MemoryDevice(name: "e2", size: 64 << 30, chunkSize: 1 << 20)
        let empty = try await ImageCompare.compare(e1, e2)
        XCTAssertEqual(empty.verdict, .identical)
        XCTAssertEqual(empty.bytesRead, 0)
    }

    func testTailOfTheLargerMustBeZero() async throws {
        let small = MemoryDevice(name: "s", size: 1 << 20)
        let large = MemoryDevice(name: "l", size: 3 << 20)
        try await large.write(at: 2 << 20, bytes: [UInt8](repeating: 0, count: 4096))
        var r = try await ImageCompare.compare(small, large)
        XCTAssertEqual(r.verdict, .identical)
        XCTAssertTrue(r.sizeMismatch)
        try await large.write(at: (2 << 20) + 1000, bytes: [1])
        r = try await ImageCompare.compare(large, small)
        XCTAssertEqual(r.verdict, .contentMismatch(offset: (2 << 20) + 512))
        var strict = CompareOptions()
        strict.strict = true
        r = try await ImageCompare.compare(small, large, options: strict)
        XCTAssertEqual(r.verdict, .sizeMismatch)
    }

    func testUnalignedExtentsOnAlignedDevices() async throws {
        for seed in UInt64(20) ... 23 {
            let (a, b) = try await pair(size: (4 << 20) + 1536, seed: seed, change: (2 << 20) + 4097, alignment: 512)
            let r = try await ImageCompare.compare(a, b)
            XCTAssertEqual(r.verdict, .contentMismatch(offset: (2 << 20) + 4096))
        }
    }
}
