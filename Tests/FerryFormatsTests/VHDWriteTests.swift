import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// The VHD writers in process: writes in parallel, nothing that reads as a VHD before the
/// commit, and after it an image qemu-img reads as the reference.
final class VHDWriteTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vhd-write") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func testBadOptionsAreRefused() {
        XCTAssertThrowsError(try VHDFormat.checkOptions(["subformat": "sparse"]))
        XCTAssertThrowsError(try VHDFormat.checkOptions(["force_size": "maybe"]))
        XCTAssertThrowsError(try VHDFormat.checkOptions(["azure": "on", "subformat": "dynamic"]))
        XCTAssertNoThrow(try VHDFormat.checkOptions(["azure": "on", "subformat": "fixed"]))
        XCTAssertThrowsError(try VHDFormat.initialFileSize(for: 2041 << 30, options: ["force_size": "on"]))
    }

    func exercise(_ options: [String: String], size: Int64, seed: UInt64) async throws {
        let name = path("w.vhd")
        let f = MemoryDevice(name: name, size: try VHDFormat.initialFileSize(for: size, options: options))
        let w = try await VHDFormat.create(file: f, size: size, options: options, context: CreateContext(location: name))
        let c = try XCTUnwrap(w as? CommittingDevice)
        XCTAssertGreaterThanOrEqual(w.size, size)
        var rng = SplitMix(seed: seed)
        var reference = [UInt8](repeating: 0, count: Int(w.size))
        var writes: [(Int64, [UInt8])] = []
        for step in 0 ..< 40 {
            let offset = Int64(rng.next() % UInt64(w.size))
            let length = min(Int64(rng.next() % (3 << 20)) + 1, w.size - offset)
            let bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: step * 7 + 1), count: Int(length))
            writes.append((offset, bytes))
            reference.replaceSubrange(Int(offset) ..< Int(offset + length), with: bytes)
        }
        // Overlapping writes, in order.
        for (offset, bytes) in writes { try await w.write(at: offset, bytes: bytes) }
        // Parallel writes of disjoint blocks (allocation races).
        try await withThrowingTaskGroup(of: Void.self) { group in
            for k in 0 ..< 8 {
                let offset = Int64(k) * (2 << 20) + 4096
                guard offset + 65536 <= w.size else { continue }
                let bytes = [UInt8](repeating: UInt8(0xA0 + k), count: 65536)
                reference.replaceSubrange(Int(offset) ..< Int(offset) + 65536, with: bytes)
                group.addTask { try await w.write(at: offset, bytes: bytes) }
            }
            try await group.waitForAll()
        }
        let back = AlignedBuffer(count: Int(w.size))
        try await w.read(at: 0, into: back.mutableBytes)
        XCTAssertTrue(Array(back.bytes) == reference, "writer read-back differs \(options)")
        // Before the commit: no footer anywhere qemu-img looks.
        try Data(f.contents()).write(to: URL(fileURLWithPath: name))
        let early = try Oracle.run("qemu-img", ["info", "-f", "vpc", name], in: dir)
        XCTAssertNotEqual(early.status, 0, "uncommitted image reads as vpc: \(early.stdout)")
        try await c.commit(durable: true)
        try Data(f.contents().prefix(Int(c.usedFileSize))).write(to: URL(fileURLWithPath: name))
        let ref = path("ref.raw")
        try Data(reference).write(to: URL(fileURLWithPath: ref))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "vpc", ref, name], in: dir)
        XCTAssertEqual(cmp.status, 0, "\(options): \(cmp.stdout) \(cmp.stderr)")
        // Ferry reads it back too.
        let got = try await withOpened(name, format: "vpc") { try await readAll($0.device) }
        XCTAssertTrue(got == Data(reference), "\(options): Ferry reads back other bytes")
        try await w.close()
    }

    func testDynamicRandomWrites() async throws {
        try await exercise([:], size: 40 << 20, seed: 1)
        try await exercise(["force_size": "on"], size: (40 << 20) + 1000, seed: 2)
    }

    /// A fixed disk hands each write over as its file does: a copy in order keeps several
    /// writes in flight on a slow file, as it does on the file alone.
    func testFixedDiskOverlapsWritesInOrder() async throws {
        let size: Int64 = 4 << 20
        let options = ["subformat": "fixed", "force_size": "on"]
        let src = MemoryDevice(name: "src", size: size)
        try await src.write(at: 0, bytes: [UInt8](repeating: 0x3c, count: Int(size)))
        let name = path("slow.vhd")
        let f = MemoryDevice(name: name, size: try VHDFormat.initialFileSize(for: size, options: options),
                             capabilities: [.write, .zero, .extents, .flush], latency: .milliseconds(2))
        let w = try await VHDFormat.create(file: f, size: size, options: options, context: CreateContext(location: name))
        var c = CopyConfiguration()
        c.workers = 8
        c.bufferSize = 65536
        _ = try await CopyEngine.copy(from: src, to: w, configuration: c)
        XCTAssertGreaterThan(f.peakInFlight, 2, "ordered writes overlapped on the file")
        var last: Int64 = -1
        for op in f.operations {
            guard let (o, l) = op.range else { continue }
            XCTAssertGreaterThanOrEqual(o, last, "write at \(o) reached the file after one ending at \(last)")
            last = o + l
        }
    }

    func testFixedRandomWrites() async throws {
        try await exercise(["subformat": "fixed"], size: 20 << 20, seed: 3)
        try await exercise(["azure": "on"], size: (20 << 20) - 5, seed: 4)
    }

    func testGeometryIsTheSpecificationsAndQemus() throws {
        // File sizes of `qemu-img create -f vpc -o subformat=fixed` (virtual size + footer).
        for (asked, qemu) in [(Int64(1_000_000), Int64(1_010_176)), (100 << 20, 104_866_304), (3 << 30, 3_221_471_744),
                              (4 << 30, 4_295_467_520), (127 << 30, 136_365_220_352)] {
            XCTAssertEqual(try VHDFormat.initialFileSize(for: asked, options: ["subformat": "fixed"]), qemu, "\(asked)")
        }
    }
}
