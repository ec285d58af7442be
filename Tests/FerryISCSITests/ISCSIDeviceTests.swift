import FerryCore
@testable import FerryISCSI
import Foundation
import XCTest
import FerryTestServers

/// The iSCSI endpoint against a real tgtd (started once for the class).
final class ISCSIDeviceTests: ISCSITestCase {
    /// The bytes of a LUN's backing file, as tgtd wrote them.
    private func backing(_ name: String, _ offset: Int, _ count: Int) throws -> [UInt8] {
        let fd = open(target.backingFile(name), O_RDONLY)
        guard fd >= 0 else { throw POSIXError(.ENOENT) }
        defer { close(fd) }
        var out = [UInt8](repeating: 0, count: count)
        let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        XCTAssertEqual(n, count)
        return out
    }

    func testProbesSizeBlockSizeAndProvisioning() async throws {
        let thin = try await ISCSIDevice.open(target.url("thin"), readOnly: false)
        XCTAssertEqual(thin.size, 64 << 20)
        XCTAssertEqual(thin.blockSize, 512)
        XCTAssertEqual(thin.limits.alignment, 512)
        XCTAssertTrue(thin.thinProvisioned)
        XCTAssertTrue(thin.capabilities.isSuperset(of: [.write, .zero, .discard, .extents, .flush]))
        XCTAssertFalse(thin.capabilities.contains(.zeroInit), "an existing LUN holds whatever it held")
        print("thin LUN: transferMax \(thin.transferMax), preferred \(thin.limits.preferredTransfer)")
        XCTAssertGreaterThanOrEqual(thin.transferMax, 512)
        XCTAssertLessThanOrEqual(thin.transferMax, 32 << 20)
        try await thin.close()

        let thick = try await ISCSIDevice.open(target.url("thick"), readOnly: false)
        XCTAssertFalse(thick.thinProvisioned)
        XCTAssertTrue(thick.capabilities.isDisjoint(with: [.zero, .discard, .extents]))
        let all = try await thick.extents(in: 4096 ..< 8192)
        XCTAssertEqual(all, [Extent(offset: 4096, length: (64 << 20) - 4096, kind: .data)])
        try await thick.close()

        let k4 = try await ISCSIDevice.open(target.url("thin4k"), readOnly: true)
        XCTAssertEqual(k4.blockSize, 4096)
        XCTAssertEqual(k4.limits.alignment, 4096)
        XCTAssertEqual(k4.size, 64 << 20)
        XCTAssertFalse(k4.capabilities.contains(.write))
        try await k4.close()
    }

    /// Loopback is a fast link: writes go out as commands as large as the LUN takes. Behind
    /// a slow one they are cut to 256 KiB, sent together, so R2T waits overlap.
    func testWriteCommandSizeFollowsTheRoundTrip() async throws {
        let d = try await ISCSIDevice.open(target.url("thick"), readOnly: false)
        defer { Task { try? await d.close() } }
        XCTAssertGreaterThan(d.roundTrip, 0)
        XCTAssertLessThan(d.roundTrip, ISCSIDevice.slowRoundTrip, "loopback measured \(d.roundTrip) ns")
        if getenv("FERRY_ISCSI_WRITE_PIECE") == nil { XCTAssertEqual(d.writePiece, d.transferMax) }
        XCTAssertEqual(ISCSIDevice.writeCommandSize(roundTrip: 2_000_000, maximum: 1 << 20, blockSize: 512, override: nil), 256 << 10)
        XCTAssertEqual(ISCSIDevice.writeCommandSize(roundTrip: 60_000, maximum: 1 << 20, blockSize: 512, override: nil), 1 << 20)
        XCTAssertEqual(ISCSIDevice.writeCommandSize(roundTrip: 60_000, maximum: 1 << 20, blockSize: 4096, override: 5000), 4096)
        XCTAssertEqual(ISCSIDevice.writeCommandSize(roundTrip: 2_000_000, maximum: 128 << 10, blockSize: 512, override: nil), 128 << 10)
    }

    /// tgtd takes 8 KiB Data-Out PDUs, each sent by libiscsi as a header and its data. On a
    /// link that keeps up, that was two segments per 8 KiB; corked, a write's PDUs leave
    /// together.
    func testWriteDataLeavesInFullSegments() async throws {
        let d = try await ISCSIDevice.open(target.url("thick"), readOnly: false)
        defer { Task { try? await d.close() } }
        let chunk = 64 << 10, count = 64
        let data = TestBuffer(count: chunk * count)
        data.fillPattern(seed: 9)
        let before = try XCTUnwrap(d.dataSegmentsSent, "the kernel reports TCP segments")
        // One at a time, so nothing queues up behind a busy receiver.
        for i in 0 ..< count {
            try await d.write(at: Int64(i * chunk), from: UnsafeRawBufferPointer(data.slice(i * chunk, chunk)), flags: [])
        }
        let sent = try XCTUnwrap(d.dataSegmentsSent) - before
        // Uncorked: 16 per write (header and data of each PDU); corked: about 2.
        XCTAssertLessThan(sent, 8 * count, "\(count) writes of 64 KiB went out in \(sent) segments")
        let back = TestBuffer(count: data.bytes.count, fill: 0)
        try await d.read(at: 0, into: back.bytes)
        XCTAssertTrue(memcmp(back.bytes.baseAddress!, data.bytes.baseAddress!, data.bytes.count) == 0)
    }

    func testConcurrentWritesSplitAboveTheMaximumAndReadBack() async throws {
        for (lun, bs) in [("thin", 512), ("thin4k", 4096)] {
            let d = try await ISCSIDevice.open(target.url(lun), readOnly: false, connections: 3)
            XCTAssertEqual(d.connectionCount, 3)
            let chunk = 48 * bs * 4
            let count = 40
            let source = TestBuffer(count: chunk * count)
            source.fillPattern(seed: UInt8(bs >> 8))
            try await withThrowingTaskGroup(of: Void.self) { g in
                for i in 0 ..< count {
                    nonisolated(unsafe) let p = UnsafeRawBufferPointer(source.slice(i * chunk, chunk))
                    g.addTask { try await d.write(at: Int64(i * chunk), from: p, flags: []) }
                }
                try await g.waitForAll()
            }
            // One request of several commands' worth, split by the device.
            let bigOffset = 40 << 20
            let big = TestBuffer(count: 3 * d.transferMax + 2 * bs)
            big.fillPattern(seed: 77)
            try await d.write(at: Int64(bigOffset), from: big.all, flags: [.fua])
            try await d.flush()

            let back = TestBuffer(count: chunk * count, fill: 0xee)
            try await d.read(at: 0, into: back.bytes)
            XCTAssertTrue(memcmp(back.bytes.baseAddress!, source.bytes.baseAddress!, chunk * count) == 0, "\(lun): what was written reads back")
            let bigBack = TestBuffer(count: big.bytes.count)
            try await d.read(at: Int64(bigOffset), into: bigBack.bytes)
            XCTAssertTrue(memcmp(bigBack.bytes.baseAddress!, big.bytes.baseAddress!, big.bytes.count) == 0, "\(lun): the split write reads back")
            try await d.close()
            // And tgtd put it in the backing file, byte for byte.
            let onDisk = try backing(lun, bigOffset, big.bytes.count)
            XCTAssertTrue(onDisk.elementsEqual(big.bytes), "\(lun): the backing file holds the data")
        }
    }

    func testZeroesUnmapOnAThinLUNAndExtentsSeeThem() async throws {
        let d = try await ISCSIDevice.open(target.url("thin"), readOnly: false)
        let data = TestBuffer(count: 8 << 20, fill: 0x5a)
        try await d.write(at: 32 << 20, from: data.all, flags: [])
        try await d.flush()
        let before = target.allocated("thin")
        XCTAssertGreaterThanOrEqual(before, 8 << 20)
        // WRITE SAME(16) with UNMAP: the backing file gets its hole back.
        try await d.writeZeroes(at: (32 << 20) + (1 << 20), length: 6 << 20, flags: [.mayUnmap])
        try await d.flush()
        let after = target.allocated("thin")
        XCTAssertLessThanOrEqual(after, before - (5 << 20), "unmapped: \(before) -> \(after) bytes allocated")
        let back = TestBuffer(count: 8 << 20, fill: 1)
        try await d.read(at: 32 << 20, into: back.bytes)
        XCTAssertTrue(back.bytes[0 ..< (1 << 20)].allSatisfy { $0 == 0x5a })
        XCTAssertTrue(back.bytes[(1 << 20) ..< (7 << 20)].allSatisfy { $0 == 0 })
        XCTAssertTrue(back.bytes[(7 << 20) ..< (8 << 20)].allSatisfy { $0 == 0x5a })

        // GET LBA STATUS: data where data is, zeros around it.
        var map: [Extent] = []
        try await d.forEachExtent(in: (31 << 20) ..< (41 << 20)) { map.append($0) }
        map = map.coalesced()
        XCTAssertEqual(map.first?.kind, .zero, "\(map)")
        XCTAssertTrue(map.contains(Extent(offset: 32 << 20, length: 1 << 20, kind: .data)), "\(map)")
        XCTAssertTrue(map.contains { $0.kind == .data && $0.range.contains(39 << 20) }, "\(map)")
        XCTAssertTrue(map.contains { $0.kind == .zero && $0.range.contains(35 << 20) }, "\(map)")

        // Without .mayUnmap the zeros stay allocated (WRITE SAME without UNMAP).
        try await d.writeZeroes(at: 50 << 20, length: 1 << 20, flags: [])
        try await d.flush()
        XCTAssertGreaterThanOrEqual(target.allocated("thin"), after + (1 << 20) - 4096)

        // UNMAP as discard.
        let beforeDiscard = target.allocated("thin")
        try await d.discard(at: 32 << 20, length: 1 << 20)
        try await d.flush()
        XCTAssertLessThanOrEqual(target.allocated("thin"), beforeDiscard - (1 << 20) + 4096)
        try await d.close()
    }

    func testZeroesOnAThickLUNAreWrittenZeros() async throws {
        let d = try await ISCSIDevice.open(target.url("thick"), readOnly: false)
        let data = TestBuffer(count: 2 << 20, fill: 0x33)
        try await d.write(at: 0, from: data.all, flags: [])
        do {
            try await d.writeZeroes(at: 0, length: 1 << 20, flags: [.fastOnly])
            XCTFail("no cheap zeroing without WRITE SAME with UNMAP")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .notSupported)
        }
        try await d.writeZeroes(at: 512, length: (1 << 20) - 1024, flags: [.mayUnmap])
        let back = TestBuffer(count: 2 << 20, fill: 1)
        try await d.read(at: 0, into: back.bytes)
        XCTAssertTrue(back.bytes[0 ..< 512].allSatisfy { $0 == 0x33 })
        XCTAssertTrue(back.bytes[512 ..< (1 << 20) - 512].allSatisfy { $0 == 0 })
        XCTAssertTrue(back.bytes[((1 << 20) - 512)...].allSatisfy { $0 == 0x33 })
        try await d.close()
    }

    func testMisuseIsRefused() async throws {
        let d = try await ISCSIDevice.open(target.url("thin4k"), readOnly: true)
        let b = TestBuffer(count: 4096)
        do {
            try await d.read(at: 512, into: b.bytes)
            XCTFail("a read not aligned to 4096-byte blocks")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .invalidArgument)
        }
        do {
            try await d.write(at: 0, from: b.all, flags: [])
            XCTFail("a write on a LUN opened read-only")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .readOnly)
        }
        try await d.close()
    }

    // MARK: Errors

    private func expectOpenFailure(_ url: String, code: FerryError.Code, mentions: [String], line: UInt = #line) async {
        do {
            let d = try await ISCSIDevice.open(url, readOnly: false)
            try? await d.close()
            XCTFail("\(url) opened", line: line)
        } catch let e as FerryError {
            XCTAssertEqual(e.code, code, "\(e)", line: line)
            XCTAssertEqual(e.path, ISCSIDevice.displayName(url), line: line)
            XCTAssertFalse(e.description.contains("wrong-password") || e.description.contains(ISCSITarget.password), "no password in: \(e)", line: line)
            for m in mentions { XCTAssertTrue(e.description.contains(m), "\(m) in: \(e)", line: line) }
        } catch {
            XCTFail("not a FerryError: \(error)", line: line)
        }
    }

    func testLoginErrors() async throws {
        await expectOpenFailure(target.url("thin", port: 3299), code: .io, mentions: ["cannot reach the iSCSI portal"])
        await expectOpenFailure(target.url("nope"), code: .notFound, mentions: ["no target", "nope"])
        await expectOpenFailure(target.url("thin", lun: 7), code: .notFound, mentions: ["LUN 7", "ILLEGAL_REQUEST"])
        await expectOpenFailure(target.url("chap"), code: .permissionDenied, mentions: ["refused"])
        await expectOpenFailure(target.chapURL(password: "wrong-password"), code: .permissionDenied, mentions: ["refused"])
        await expectOpenFailure("iscsi://127.0.0.1:\(target.port)/\(ISCSITarget.iqn):thin", code: .invalidArgument, mentions: ["not a valid iSCSI URL"])
        // The right password logs in, and the name the device goes by has no password.
        let d = try await ISCSIDevice.open(target.chapURL(), readOnly: true)
        XCTAssertEqual(d.name, "iscsi://ferry@127.0.0.1:\(target.port)/\(ISCSITarget.iqn):chap/1")
        try await d.close()
    }

    func testCheckConditionNamesTheSense() async throws {
        let d = try await ISCSIDevice.open(target.url("readonly"), readOnly: false)
        let b = TestBuffer(count: 4096, fill: 9)
        do {
            try await d.write(at: 8192, from: b.all, flags: [])
            XCTFail("a write-protected LUN took a write")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .readOnly, "\(e)")
            XCTAssertEqual(e.offset, 8192)
            XCTAssertTrue(e.description.contains("DATA PROTECTION") && e.description.contains("0x27/0x00"), "\(e)")
        }
        try await d.close()
    }

    func testTooSmallLUNIsRefusedBeforeWriting() async throws {
        do {
            let d = try await ISCSIDevice.openTarget(target.url("thin"), size: (64 << 20) + 512)
            try? await d.close()
            XCTFail("a LUN smaller than the source")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .tooSmall)
        }
        let d = try await ISCSIDevice.openTarget(target.url("thin"), size: 64 << 20)
        try await d.close()
    }

    func testTargetKilledFailsRequestsInFlight() async throws {
        let t = try ISCSITarget(name: "dying", port: 3282, control: 82)
        defer { t.stop() }
        let d = try await ISCSIDevice.open(t.url("thick"), readOnly: false, connections: 2)
        let b = TestBuffer(count: 1 << 20, fill: 3)
        try await d.write(at: 0, from: b.all, flags: [])
        if let pid = t.pid { kill(pid, SIGKILL) }
        usleep(100_000)
        do {
            for i in 0 ..< 64 { try await d.write(at: Int64(i) << 20, from: b.all, flags: []) }
            XCTFail("writes to a dead target succeeded")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .io, "\(e)")
            XCTAssertEqual(e.path, t.url("thick"))
        }
        try await d.close()
    }
}
