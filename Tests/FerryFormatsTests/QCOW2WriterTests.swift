import FerryConvert
import FerryCore
import FerryFile
@testable import FerryFormats
import Foundation
import XCTest

/// The qcow2 writer on its own: random writes and zeroes (aligned and not, over a backing
/// file and not, compressed and not) against a reference buffer, read back by the writer, by
/// Ferry's reader and by qemu-img after the commit.
final class QCOW2WriterTests: XCTestCase {
    var dir: URL!
    override func setUpWithError() throws { dir = try scratchDirectory("qcow2writer") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Makes an image with `options`, applies random operations, commits, and compares.
    func exercise(_ options: [String: String], size: Int64 = 3 << 20, backing: Bool = false, compress: Bool = false,
                  seed: UInt64, steps: Int = 60, file: StaticString = #filePath, line: UInt = #line) async throws {
        var rng = SplitMix(seed: seed)
        var reference = [UInt8](repeating: 0, count: Int(size))
        var opts = options
        if backing {
            try Oracle.must("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "\(size)"], in: dir)
            try Oracle.must("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 \(size)", "base.raw"], in: dir)
            reference = [UInt8](repeating: 0x77, count: Int(size))
            opts["backing_file"] = "base.raw"
            opts["backing_fmt"] = "raw"
        }
        let name = path("w.qcow2")
        try? FileManager.default.removeItem(atPath: name)
        let image = try await Images.create(name, format: "qcow2", size: size, options: opts)
        let w = try XCTUnwrap(image.device as? QCOW2Writer)
        if compress { w.enableCompression() }
        let cs = Int64(w.cs)
        for step in 0 ..< steps {
            let kind = rng.next() % 4
            var offset = Int64(rng.next() % UInt64(size))
            var length = Int64(rng.next() % UInt64(3 * cs)) + 1
            if rng.next() % 2 == 0 { offset = offset / cs * cs; length = (length + cs - 1) / cs * cs }
            length = min(length, size - offset)
            guard length > 0 else { continue }
            if kind == 0 {
                try await w.writeZeroes(at: offset, length: length, flags: rng.next() % 2 == 0 ? [.mayUnmap] : [])
                for k in Int(offset) ..< Int(offset + length) { reference[k] = 0 }
            } else {
                let byte = UInt8(truncatingIfNeeded: step * 7 + 1)
                // Half random bytes (incompressible), half a pattern.
                let bytes = (0 ..< Int(length)).map { k in k < Int(length) / 2 ? UInt8(truncatingIfNeeded: rng.next()) : byte }
                try await put(w, bytes, at: offset)
                reference.replaceSubrange(Int(offset) ..< Int(offset + length), with: bytes)
            }
        }
        // The writer reads back what was written.
        let back = AlignedBuffer(count: Int(size))
        try await w.read(at: 0, into: back.mutableBytes)
        XCTAssertTrue(Array(back.bytes) == reference, "writer read-back differs \(options)", file: file, line: line)
        try await Images.finish(image, durable: true)

        let check = try Oracle.run("qemu-img", ["check", name], in: dir)
        XCTAssertEqual(check.status, 0, "\(options): \(check.stdout) \(check.stderr)", file: file, line: line)
        XCTAssertFalse(check.stdout.contains("leak"), check.stdout, file: file, line: line)
        let ref = path("ref.raw")
        try Data(reference).write(to: URL(fileURLWithPath: ref))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", ref, name], in: dir)
        XCTAssertEqual(cmp.status, 0, "\(options) backing=\(backing) compress=\(compress): \(cmp.stdout) \(cmp.stderr)", file: file, line: line)
        // Ferry's reader agrees.
        let ours = try await withOpened(name) { try await readAll($0.device) }
        XCTAssertTrue(ours == Data(reference), "Ferry's reader differs \(options)", file: file, line: line)
    }

    func testRandomWritesVersion3() async throws {
        try await exercise([:], seed: 1)
        try await exercise(["cluster_size": "4k"], seed: 2)
    }

    func testRandomWritesVersion2() async throws {
        try await exercise(["compat": "0.10"], seed: 3)
        try await exercise(["compat": "0.10"], backing: true, seed: 4)
    }

    func testRandomWritesOverBacking() async throws {
        try await exercise([:], backing: true, seed: 5)
        try await exercise(["extended_l2": "on"], backing: true, seed: 6)
    }

    func testRandomWritesExtendedL2() async throws {
        try await exercise(["extended_l2": "on", "cluster_size": "32k"], seed: 7)
    }

    func testRandomWritesCompressed() async throws {
        // Compressed clusters written again take new space (nothing is reused while an image
        // is written), so fewer operations on a larger image.
        try await exercise([:], size: 8 << 20, compress: true, seed: 8, steps: 30)
        try await exercise(["compression_type": "zstd", "refcount_bits": "1"], size: 8 << 20, compress: true, seed: 9, steps: 30)
        try await exercise(["refcount_bits": "2"], size: 8 << 20, backing: true, compress: true, seed: 10, steps: 30)
    }

    func testCommitTwiceAndWriteBetween() async throws {
        let name = path("twice.qcow2")
        let image = try await Images.create(name, format: "qcow2", size: 1 << 20, options: [:])
        let w = try XCTUnwrap(image.device as? QCOW2Writer)
        // Written under its partial name until `finish` renames it.
        let writing = image.partial?.path ?? name
        let a = [UInt8](repeating: 0xAA, count: 65536)
        try await put(w, a, at: 0)
        try await w.commit(durable: true)
        // Complete now.
        XCTAssertEqual(try Oracle.run("qemu-img", ["check", writing], in: dir).status, 0)
        try await put(w, a, at: 131072)
        // Incomplete again until the next commit.
        let mid = try Oracle.run("qemu-img", ["check", writing], in: dir)
        XCTAssertNotEqual(mid.status, 0)
        XCTAssertTrue(mid.stderr.contains("ferry: conversion incomplete"), mid.stderr)
        try await Images.finish(image, durable: true)
        let check = try Oracle.run("qemu-img", ["check", name], in: dir)
        XCTAssertEqual(check.status, 0, check.stdout)
        let map = try Oracle.map(name, in: dir)
        XCTAssertEqual(map.filter { ($0["data"] as? Bool) == true }.count, 2, "\(map)")
    }

    /// A request larger than the file takes at once (NFS: 1 MiB) goes out as pieces all in
    /// flight together, and the next request's pieces still come after all of them. Awaiting
    /// each piece in turn held the write turn a round trip per piece.
    func testPiecesOfOneRequestOverlapAndKeepOrder() async throws {
        let run = try await copyOverSlowFile("small-max", seed: 33, size: 4 << 20, workers: 1, maximumTransfer: 64 << 10)
        let dataWrites = run.dataWrites { $0 == 65536 }
        XCTAssertEqual(dataWrites.count, Int(run.size / 65536))
        let first = try XCTUnwrap(dataWrites.min())
        let requests = dataWrites.map { ($0 - first) / (256 << 10) }
        XCTAssertEqual(requests, requests.sorted(), "every piece of a request before any of the next")
        XCTAssertGreaterThanOrEqual(run.file.peakInFlight, 3, "one worker, yet its pieces overlapped")
        try await checkWithQemu(run)
    }

    /// An in-order copy to qcow2 over a slow file: clusters are still laid out in guest
    /// order, yet several data writes are in flight on the file at once.
    func testInOrderCopyOverlapsDataWritesAndKeepsGuestOrder() async throws {
        let run = try await copyOverSlowFile("slow", seed: 21, size: 8 << 20, workers: 8, maximumTransfer: 32 << 20)
        let dataWrites = run.dataWrites { $0 >= 65536 }
        XCTAssertEqual(dataWrites.count, Int(run.size / (256 << 10)))
        XCTAssertEqual(dataWrites, dataWrites.sorted(), "host clusters follow guest order")
        XCTAssertGreaterThan(run.file.peakInFlight, 2, "data writes overlapped")
        try await checkWithQemu(run)
    }

    /// What `copyOverSlowFile` copied and where.
    struct SlowCopy {
        var name: String
        var size: Int64
        var data: [UInt8]
        var file: MemoryDevice
        var writer: QCOW2Writer
        /// Operations on the file before the copy started.
        var before: Int

        /// Offsets of the copy's writes whose length passes `keep`, in the order issued.
        func dataWrites(_ keep: (Int64) -> Bool) -> [Int64] {
            file.operations[before...].compactMap { op -> Int64? in
                if case .write(let o, let l) = op, keep(l) { return o }
                return nil
            }
        }
    }

    /// Random data copied in order (256 KiB requests) into a new qcow2 on a memory file that
    /// answers in 1-3 ms and takes at most `maximumTransfer` bytes a request.
    func copyOverSlowFile(_ name: String, seed: UInt64, size: Int64, workers: Int, maximumTransfer: Int) async throws -> SlowCopy {
        let source = MemoryDevice(name: "src", size: size)
        var rng = SplitMix(seed: seed)
        let data = (0 ..< Int(size)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        try await put(source, data, at: 0)
        let file = MemoryDevice(name: name + ".qcow2", size: try QCOW2Format.initialFileSize(for: size, options: [:]),
                                limits: BlockLimits(alignment: 1, preferredTransfer: 64 << 10, maximumTransfer: maximumTransfer),
                                latency: .milliseconds(1), jitter: .milliseconds(2))
        let created = try await QCOW2Format.create(file: file, size: size, options: [:], context: CreateContext(location: file.name))
        let w = try XCTUnwrap(created as? QCOW2Writer)
        let before = file.operations.count
        var c = CopyConfiguration()
        c.workers = workers
        c.bufferSize = 256 << 10
        c.targetReadsZero = true
        _ = try await CopyEngine.copy(from: source, to: w, configuration: c)
        return SlowCopy(name: name, size: size, data: data, file: file, writer: w, before: before)
    }

    /// Commits the image and has qemu-img check it and compare it with the data.
    func checkWithQemu(_ run: SlowCopy) async throws {
        try await run.writer.commit(durable: true)
        let image = path(run.name + ".qcow2")
        try Data(run.file.contents().prefix(Int(run.writer.usedFileSize))).write(to: URL(fileURLWithPath: image))
        let check = try Oracle.run("qemu-img", ["check", image], in: dir)
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        let raw = path(run.name + ".raw")
        try Data(run.data).write(to: URL(fileURLWithPath: raw))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", raw, image], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    func testOptionsAreCheckedTogether() {
        for bad in [["extended_l2": "on", "cluster_size": "8k"], ["refcount_bits": "24"], ["cluster_size": "4M"],
                    ["compat": "0.10", "lazy_refcounts": "on"], ["compat": "0.10", "compression_type": "zstd"],
                    ["preallocation": "sometimes"], ["backing_fmt": "raw"], ["compression_type": "lz4"]] {
            XCTAssertThrowsError(try QCOW2Format.checkOptions(bad), "\(bad)")
        }
        XCTAssertNoThrow(try QCOW2Format.checkOptions(["extended_l2": "on", "cluster_size": "16k", "refcount_bits": "64"]))
    }
}


/// Writes `bytes` at `offset` through an aligned buffer.
func put(_ device: any BlockDevice, _ bytes: [UInt8], at offset: Int64) async throws {
    let b = AlignedBuffer(count: bytes.count)
    bytes.withUnsafeBytes { b.mutableBytes.copyMemory(from: $0) }
    try await device.write(at: offset, from: b.bytes, flags: [])
}
