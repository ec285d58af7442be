import FerryConvert
import FerryCore
@testable import FerryFormats
import Foundation
import XCTest

/// New VHDX images written by Ferry, judged by qemu-img check and compare.
final class VHDXWriteTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("vhdx-write") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }
    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func testBadOptionsAreRefused() throws {
        for (o, words) in [(["subformat": "diff"], "invalid subformat 'diff'"), (["block_size": "3M"], "invalid block_size '3M'"),
                           (["block_size": "512M"], "invalid block_size"), (["log_size": "1000"], "invalid log_size"),
                           (["block_state_zero": "maybe"], "invalid block_state_zero")] {
            XCTAssertThrowsError(try VHDXFormat.checkOptions(o)) { e in
                XCTAssertTrue((e as? FerryError)?.description.contains(words) ?? false, "\(e)")
            }
        }
        XCTAssertNoThrow(try VHDXFormat.checkOptions(["subformat": "fixed", "block_size": "1M", "log_size": "2M", "block_state_zero": "off"]))
        XCTAssertEqual(try VHDXCreateOptions([:]).blockSize(for: 64 << 20), 8 << 20)
        XCTAssertEqual(try VHDXCreateOptions([:]).blockSize(for: 2 << 30), 16 << 20)
        XCTAssertEqual(try VHDXCreateOptions([:]).blockSize(for: 200 << 30), 32 << 20)
        XCTAssertEqual(try VHDXCreateOptions([:]).blockSize(for: 40 << 40), 64 << 20)
    }

    /// Random writes and zeroes (many at once) into a new image on a memory file, read back
    /// by the writer, then judged by qemu-img.
    func exercise(_ options: [String: String], size: Int64 = (5 << 20) + 4096, seed: UInt64, steps: Int = 30,
                  file: StaticString = #filePath, line: UInt = #line) async throws {
        var rng = SplitMix(seed: seed)
        var reference = [UInt8](repeating: 0, count: Int(size))
        let name = path("w-\(seed).vhdx")
        let fileSize = try VHDXFormat.initialFileSize(for: size, options: options)
        let f = MemoryDevice(name: name, size: fileSize)
        let created = try await VHDXFormat.create(file: f, size: size, options: options, context: CreateContext(location: name))
        let w = try XCTUnwrap(created as? VHDXNewImage)
        XCTAssertTrue(w.capabilities.contains(.zeroInit))
        var batch: [(Int64, [UInt8]?, Int64)] = []
        for step in 0 ..< steps {
            var offset = Int64(rng.next() % UInt64(size)) / 512 * 512
            var length = Int64(rng.next() % UInt64(2 << 20)) / 512 * 512 + 512
            if rng.next() % 2 == 0 { offset = offset / (1 << 20) * (1 << 20); length = (length + (1 << 20) - 1) / (1 << 20) * (1 << 20) }
            length = min(length, size - offset)
            guard length > 0 else { continue }
            if rng.next() % 4 == 0 {
                batch.append((offset, nil, length))
                reference.replaceSubrange(Int(offset) ..< Int(offset + length), with: repeatElement(0, count: Int(length)))
            } else {
                let byte = UInt8(truncatingIfNeeded: step * 7 + 1)
                var bytes = [UInt8](repeating: byte, count: Int(length))
                for k in stride(from: 0, to: bytes.count, by: 4096) { bytes[k] = UInt8(truncatingIfNeeded: rng.next()) }
                batch.append((offset, bytes, length))
                reference.replaceSubrange(Int(offset) ..< Int(offset + length), with: bytes)
            }
        }
        // Non-overlapping ones in parallel: the same final bytes whatever the order.
        var i = 0
        while i < batch.count {
            var group: [(Int64, [UInt8]?, Int64)] = [batch[i]]
            i += 1
            while i < batch.count, !group.contains(where: { $0.0 < batch[i].0 + batch[i].2 && batch[i].0 < $0.0 + $0.2 }) {
                group.append(batch[i])
                i += 1
            }
            try await withThrowingTaskGroup(of: Void.self) { g in
                for (o, b, l) in group {
                    g.addTask {
                        if let b { try await put(w, b, at: o) } else { try await w.writeZeroes(at: o, length: l, flags: [.mayUnmap]) }
                    }
                }
                try await g.waitForAll()
            }
        }
        let back = AlignedBuffer(count: Int(size))
        try await w.read(at: 0, into: back.mutableBytes)
        XCTAssertTrue(Array(back.bytes) == reference, "writer read-back differs \(options)", file: file, line: line)
        XCTAssertTrue(f.contents().prefix(1 << 20).allSatisfy { $0 == 0 }, "no signature nor header before the commit", file: file, line: line)
        try await w.commit(durable: true)
        XCTAssertEqual(Array(f.contents().prefix(8)), Array("vhdxfile".utf8), file: file, line: line)
        try Data(f.contents().prefix(Int(w.usedFileSize))).write(to: URL(fileURLWithPath: name))

        let check = try Oracle.run("qemu-img", ["check", name], in: dir)
        XCTAssertEqual(check.status, 0, "\(options): \(check.stdout) \(check.stderr)", file: file, line: line)
        let ref = path("ref.raw")
        try Data(reference).write(to: URL(fileURLWithPath: ref))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "vhdx", ref, name], in: dir)
        XCTAssertEqual(cmp.status, 0, "\(options): \(cmp.stdout) \(cmp.stderr)", file: file, line: line)
        // Ferry reads back what it wrote.
        try await withOpened(name) { image in
            let data = try await readAll(image.device)
            XCTAssertTrue(data == Data(reference), file: file, line: line)
        }
    }

    func testRandomWritesDynamic() async throws {
        try await exercise(["block_size": "1M"], seed: 1)
        try await exercise([:], seed: 2)
        try await exercise(["block_size": "2M", "block_state_zero": "off", "log_size": "3M"], seed: 3)
    }

    func testRandomWritesFixed() async throws {
        try await exercise(["subformat": "fixed", "block_size": "1M"], seed: 4)
    }

    /// Unwritten blocks are ZERO (qemu-img's default) or NOT_PRESENT with block_state_zero=off;
    /// a fixed image has every block FULLY_PRESENT and leaves its blocks allocated.
    func testBlockStates() async throws {
        for (options, expect) in [([String: String](), UInt64(2)), (["block_state_zero": "off"], 0), (["subformat": "fixed"], 6)] {
            let size: Int64 = 64 << 20
            let name = path("states.vhdx")
            let f = MemoryDevice(name: name, size: try VHDXFormat.initialFileSize(for: size, options: options))
            let created = try await VHDXFormat.create(file: f, size: size, options: options, context: CreateContext(location: name))
            let w = try XCTUnwrap(created as? VHDXNewImage)
            try await w.commit(durable: false)
            let bytes = f.contents()
            let bat = Int(w.layout.batOffset)
            for b in 0 ..< 8 {
                let e = bytes[bat + b * 8 ..< bat + b * 8 + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                XCTAssertEqual(e & 7, expect, "\(options) block \(b)")
            }
            try Data(bytes.prefix(Int(w.usedFileSize))).write(to: URL(fileURLWithPath: name))
            try Oracle.must("qemu-img", ["check", name], in: dir)
            let info = try Oracle.must("qemu-img", ["info", name], in: dir)
            XCTAssertTrue(info.contains("cluster_size: 8388608"), info)
        }
    }
}
