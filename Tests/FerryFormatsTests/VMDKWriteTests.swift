import FerryConvert
import FerryCore
import FerryFile
@testable import FerryFormats
import Foundation
import XCTest

/// The VMDK writers on their own: option checks as qemu-img's, the sparse layout and
/// descriptor against what qemu-img writes, random writes and zeroes (over a backing file
/// and not, with zeroed grains and not) judged by qemu-img, and the stream writer fed by the
/// copy engine with many workers.
final class VMDKWriteTests: XCTestCase {
    var dir: URL!
    override func setUpWithError() throws { dir = try scratchDirectory("vmdkwrite") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    // MARK: - options

    func testBadOptionsAreRefusedAsQemuDoes() {
        let cases: [([String: String], String)] = [
            (["subformat": "foo"], "subformat"),
            (["adapter_type": "scsi"], "adapter_type"),
            (["compat6": "on", "hwversion": "7"], "compat6 cannot be enabled with hwversion set"),
            (["zeroed_grain": "maybe"], "zeroed_grain"),
            (["subformat": "monolithicFlat", "backing_file": "b.vmdk"], "backing file"),
            (["subformat": "twoGbMaxExtentFlat", "zeroed_grain": "on"], "zeroed_grain"),
            (["backing_file": "b.qcow2", "backing_fmt": "qcow2"], "must be vmdk"),
        ]
        for (options, mention) in cases {
            XCTAssertThrowsError(try VMDKFormat.checkOptions(options), "\(options)") { error in
                let e = error as? FerryError
                XCTAssertEqual(e?.code, .invalidArgument, "\(options)")
                XCTAssertTrue(e?.message.contains(mention) ?? false, "\(options): \(String(describing: e?.message))")
            }
        }
        for good in [[:], ["adapter_type": "legacyESX"], ["compat6": "on", "hwversion": "undefined"], ["hwversion": "10"],
                     ["toolsversion": "1234"], ["zeroed_grain": "on"], ["subformat": "streamOptimized", "backing_file": "b.vmdk"]] {
            XCTAssertNoThrow(try VMDKFormat.checkOptions(good), "\(good)")
        }
        XCTAssertEqual(try VMDKCreateOptions(["compat6": "yes"]).hwVersion, "6")
        XCTAssertEqual(try VMDKCreateOptions([:]).hwVersion, "4")
    }

    // MARK: - layout

    func testSparseLayoutIsQemus() throws {
        // Sizes of one, some, and many grain tables; the sectors qemu-img puts each thing at.
        for size in ["1M", "1000", "3G", "5G"] {
            try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "q.vmdk", size], in: dir)
            let b = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path("q.vmdk"))))
            func le(_ o: Int, _ n: Int) -> Int64 { b[o ..< o + n].reversed().reduce(0) { $0 << 8 | Int64($1) } }
            let l = VMDKLayout.Sparse(capacity: le(12, 8))
            XCTAssertEqual(le(48, 8), l.rgdOffset, size)
            XCTAssertEqual(le(56, 8), l.gdOffset, size)
            XCTAssertEqual(le(64, 8), l.overhead, size)
            // qemu's first grain table follows its directory.
            if l.tables > 0 {
                XCTAssertEqual(le(Int(l.gdOffset) * 512, 4), l.table(0, redundant: false), size)
                XCTAssertEqual(le(Int(l.rgdOffset) * 512, 4), l.table(0, redundant: true), size)
            }
        }
    }

    func testExtentNamesAreQemus() {
        XCTAssertEqual(VMDKLayout.extentName("/a/b/disk.vmdk", suffix: "flat"), "disk-flat.vmdk")
        XCTAssertEqual(VMDKLayout.extentName("my.disk.vmdk", suffix: "s001"), "my.disk-s001.vmdk")
        XCTAssertEqual(VMDKLayout.extentName("noext", suffix: "f002"), "noext-f002")
        XCTAssertEqual(VMDKLayout.sibling("d-flat.vmdk", of: "/x/y/d.vmdk"), "/x/y/d-flat.vmdk")
        XCTAssertEqual(VMDKLayout.sibling("d-flat.vmdk", of: "d.vmdk"), "d-flat.vmdk")
    }

    func testDescriptorIsQemusButTheCID() throws {
        for (options, size) in [("adapter_type=lsilogic,hwversion=10,toolsversion=1234", "5G"), ("compat6=on", "3M"), ("adapter_type=ide", "0"), ("adapter_type=ide", "100G"), ("adapter_type=buslogic", "1T")] {
            try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "-o", options, "q.vmdk", size], in: dir)
            var opts: [String: String] = [:]
            for kv in options.split(separator: ",") {
                let p = kv.split(separator: "=")
                opts[String(p[0])] = String(p[1])
            }
            let o = try VMDKCreateOptions(opts)
            let bytes = ByteSize.parse(size)!
            let ours = VMDKLayout.descriptor(cid: 0x1234abcd, parentCID: 0xFFFF_FFFF, createType: "monolithicSparse", parentHint: nil,
                                             extents: ["RW \(VMDKLayout.sectors(bytes)) SPARSE \"q.vmdk\""],
                                             sizeSectors: VMDKLayout.sectors(bytes), options: o)
            let data = try Data(contentsOf: URL(fileURLWithPath: path("q.vmdk")))
            let theirs = String(decoding: data[512 ..< 512 * 21].prefix { $0 != 0 }, as: UTF8.self)
            func noCID(_ s: String) -> [Substring] { s.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.hasPrefix("CID=") } }
            XCTAssertEqual(noCID(ours), noCID(theirs), options)
            XCTAssertTrue(ours.contains("CID=1234abcd\n"))
        }
    }

    // MARK: - sparse writer

    /// A monolithicSparse image on a memory file: random writes and zeroes, read back by the
    /// writer, then judged by qemu-img (over `base.vmdk` when `backing`).
    func exercise(_ options: [String: String], size: Int64 = 3 << 20 + 4096, backing: Bool = false, seed: UInt64, steps: Int = 60,
                  file: StaticString = #filePath, line: UInt = #line) async throws {
        var rng = SplitMix(seed: seed)
        var reference = [UInt8](repeating: 0, count: Int(size))
        var opts = options
        var backingDevice: (any BlockDevice)?
        if backing {
            try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "base.vmdk", "\(size)"], in: dir)
            try Oracle.must("qemu-io", ["-f", "vmdk", "-c", "write -P 0x77 0 \(size)", "base.vmdk"], in: dir)
            reference = [UInt8](repeating: 0x77, count: Int(size))
            // The backing image as Ferry reads it (the writer takes its CID from it).
            backingDevice = try await Images.open(ImageSpec(path("base.vmdk"), format: "vmdk"), readOnly: true).device
            opts["backing_file"] = "base.vmdk"
            opts["backing_fmt"] = "vmdk"
        }
        let name = path("w.vmdk")
        let fileSize = try VMDKFormat.initialFileSize(for: size, options: opts)
        let f = MemoryDevice(name: name, size: fileSize)
        let created = try await VMDKFormat.create(file: f, size: size, options: opts,
                                                  context: CreateContext(location: name, backing: backingDevice, backingFormat: backing ? "vmdk" : nil))
        let w = try XCTUnwrap(created as? VMDKSparseWriter)
        let gs = VMDKLayout.grainSize
        for step in 0 ..< steps {
            let kind = rng.next() % 4
            var offset = Int64(rng.next() % UInt64(size))
            var length = Int64(rng.next() % UInt64(3 * gs)) + 1
            if rng.next() % 2 == 0 { offset = offset / gs * gs; length = (length + gs - 1) / gs * gs }
            length = min(length, size - offset)
            guard length > 0 else { continue }
            if kind == 0 {
                try await w.writeZeroes(at: offset, length: length, flags: [.mayUnmap])
                for k in Int(offset) ..< Int(offset + length) { reference[k] = 0 }
            } else {
                let byte = UInt8(truncatingIfNeeded: step * 7 + 1)
                let bytes = (0 ..< Int(length)).map { k in k < Int(length) / 2 ? UInt8(truncatingIfNeeded: rng.next()) : byte }
                try await put(w, bytes, at: offset)
                reference.replaceSubrange(Int(offset) ..< Int(offset + length), with: bytes)
            }
        }
        let back = AlignedBuffer(count: Int(size))
        try await w.read(at: 0, into: back.mutableBytes)
        XCTAssertTrue(Array(back.bytes) == reference, "writer read-back differs \(options)", file: file, line: line)
        XCTAssertEqual(f.contents().prefix(4), [0, 0, 0, 0], "no magic before the commit", file: file, line: line)
        try await w.commit(durable: true)
        try Data(f.contents().prefix(Int(w.usedFileSize))).write(to: URL(fileURLWithPath: name))

        let check = try Oracle.run("qemu-img", ["check", name], in: dir)
        XCTAssertEqual(check.status, 0, "\(options): \(check.stdout) \(check.stderr)", file: file, line: line)
        let ref = path("ref.raw")
        try Data(reference).write(to: URL(fileURLWithPath: ref))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "vmdk", ref, name], in: dir)
        XCTAssertEqual(cmp.status, 0, "\(options) backing=\(backing): \(cmp.stdout) \(cmp.stderr)", file: file, line: line)
        let info = try Oracle.must("qemu-img", ["info", "--output=json", name], in: dir)
        if backing {
            XCTAssertTrue(info.contains("\"backing-filename\": \"base.vmdk\""), info, file: file, line: line)
            // parentCID is the base's CID, as a number: qemu writes it without leading zeros
            // ("CID=5abdb34"), Ferry with eight digits.
            func field(_ key: String, of file: String) throws -> UInt32? {
                let text = String(decoding: try Data(contentsOf: URL(fileURLWithPath: file)).prefix(8192), as: UTF8.self)
                return text.split(separator: "\n").first { $0.hasPrefix(key + "=") }.flatMap { UInt32($0.dropFirst(key.count + 1), radix: 16) }
            }
            let cid = try XCTUnwrap(try field("CID", of: path("base.vmdk")))
            XCTAssertEqual(try field("parentCID", of: name), cid, file: file, line: line)
        }
    }

    func testRandomWritesSparse() async throws {
        try await exercise([:], seed: 1)
        try await exercise(["zeroed_grain": "on"], seed: 2)
    }

    func testRandomWritesOverBacking() async throws {
        try await exercise([:], backing: true, seed: 3)
        try await exercise(["zeroed_grain": "on"], backing: true, seed: 4)
    }

    func testZeroedGrainsAreRecorded() async throws {
        let name = path("z.vmdk")
        let size: Int64 = 1 << 20
        let f = MemoryDevice(name: name, size: try VMDKFormat.initialFileSize(for: size, options: ["zeroed_grain": "on"]))
        let made = try await VMDKFormat.create(file: f, size: size, options: ["zeroed_grain": "on"], context: CreateContext(location: name))
        let w = try XCTUnwrap(made as? VMDKSparseWriter)
        XCTAssertTrue(w.capabilities.contains(.zero))
        try await put(w, [UInt8](repeating: 9, count: 65536), at: 0)
        try await w.writeZeroes(at: 0, length: 1 << 20, flags: [])
        try await w.commit(durable: false)
        try Data(f.contents().prefix(Int(w.usedFileSize))).write(to: URL(fileURLWithPath: name))
        let header = f.contents()
        XCTAssertEqual(header[4], 2, "version 2 for zeroed grains")
        XCTAssertEqual(header[8] & 4, 4, "zeroed-grain flag")
        let map = try Oracle.map(name, in: dir)
        XCTAssertEqual(map.count, 1, "\(map)")
        XCTAssertEqual(map.first?["zero"] as? Bool, true, "\(map)")
        XCTAssertEqual(map.first?["data"] as? Bool, false, "\(map)")
    }

    // MARK: - stream writer

    /// Random data with zero runs copied by the engine (many workers) into a
    /// streamOptimized image on a memory file that answers slowly.
    func testStreamCopyKeepsGuestOrderAndIsValid() async throws {
        let size: Int64 = 70 << 20 + 12345
        let source = MemoryDevice(name: "src", size: size)
        var rng = SplitMix(seed: 42)
        var data = [UInt8](repeating: 0, count: Int(size))
        // Data in pieces: random (does not shrink), text-like, zero runs between.
        var pos = 0
        while pos < data.count {
            let n = min(data.count - pos, Int(rng.next() % (3 << 20)) + 1)
            switch rng.next() % 3 {
            case 0: for k in pos ..< pos + n { data[k] = UInt8(truncatingIfNeeded: rng.next()) }
            case 1: for k in pos ..< pos + n { data[k] = UInt8(65 + (k * 7 + k / 13) % 26) }
            default: break
            }
            pos += n
        }
        try await put(source, data, at: 0)
        let name = path("s.vmdk")
        let opts = ["subformat": "streamOptimized"]
        let file = MemoryDevice(name: name, size: try VMDKFormat.initialFileSize(for: size, options: opts),
                                limits: BlockLimits(alignment: 1, preferredTransfer: 64 << 10, maximumTransfer: 1 << 20),
                                latency: .microseconds(200), jitter: .microseconds(500))
        let made = try await VMDKFormat.create(file: file, size: size, options: opts, context: CreateContext(location: name))
        let w = try XCTUnwrap(made as? VMDKStreamWriter)
        XCTAssertTrue(w.capabilities.contains(.sequentialWrites))
        XCTAssertTrue(w.compressesWrites)
        var c = CopyConfiguration()
        c.workers = 8
        c.bufferSize = 256 << 10
        c.outOfOrder = false
        c.targetReadsZero = true
        _ = try await CopyEngine.copy(from: source, to: w, configuration: c)
        try await w.commit(durable: true)
        let bytes = Array(file.contents().prefix(Int(w.usedFileSize)))
        try Data(bytes).write(to: URL(fileURLWithPath: name))

        // Header: version 3, compressed grains with markers, the directory named in both the
        // header and the footer (as qemu-img writes it).
        XCTAssertEqual(Array(bytes[0 ..< 4]), Array("KDMV".utf8))
        func u32(_ o: Int) -> UInt32 { bytes[o ..< o + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        func u64(_ o: Int) -> UInt64 { bytes[o ..< o + 8].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        let end = bytes.count
        XCTAssertEqual(u32(4), 3)
        XCTAssertEqual(u32(8), 0x30001)
        XCTAssertEqual(u64(56), u64(end - 1024 + 56), "the header names the footer's directory")
        XCTAssertEqual(bytes[77], 1, "deflate")
        // Footer marker, footer, end-of-stream marker: the last three sectors.
        XCTAssertEqual(u64(end - 1536), 1)
        XCTAssertEqual(u32(end - 1536 + 12), 3)
        XCTAssertEqual(Array(bytes[end - 1024 ..< end - 1020]), Array("KDMV".utf8))
        XCTAssertNotEqual(u64(end - 1024 + 56), UInt64.max)
        XCTAssertTrue(bytes[end - 512 ..< end].allSatisfy { $0 == 0 })
        // Grains ascend in guest order through the file.
        var lbas: [UInt64] = []
        var p = 65536
        while p < end - 1536 {
            let sizeField = Int(u32(p + 8))
            if sizeField > 0 {
                lbas.append(u64(p))
                p += (12 + sizeField + 511) / 512 * 512
            } else {
                p += 512 + Int(u64(p)) * 512
            }
        }
        XCTAssertEqual(lbas, lbas.sorted())
        XCTAssertGreaterThan(lbas.count, 100)

        let check = try Oracle.run("qemu-img", ["check", name], in: dir)
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        let raw = path("s.raw")
        try Data(data).write(to: URL(fileURLWithPath: raw))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "vmdk", raw, name], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    /// Over a backing file, zero runs become zero grains and what is not written shows the
    /// backing file.
    func testStreamOverBacking() async throws {
        let size: Int64 = 1 << 20
        try Oracle.must("qemu-img", ["create", "-q", "-f", "vmdk", "base.vmdk", "\(size)"], in: dir)
        try Oracle.must("qemu-io", ["-f", "vmdk", "-c", "write -P 0x77 0 \(size)", "base.vmdk"], in: dir)
        var reference = [UInt8](repeating: 0x77, count: Int(size))
        let b = try await Images.open(ImageSpec(path("base.vmdk"), format: "vmdk"), readOnly: true).device
        let name = path("so.vmdk")
        let opts = ["subformat": "streamOptimized", "backing_file": "base.vmdk", "backing_fmt": "vmdk"]
        let file = MemoryDevice(name: name, size: try VMDKFormat.initialFileSize(for: size, options: opts))
        let w = try await VMDKFormat.create(file: file, size: size, options: opts,
                                            context: CreateContext(location: name, backing: b, backingFormat: "vmdk"))
        XCTAssertFalse(w.capabilities.contains(.zeroInit))
        let data = (0 ..< 131072).map { UInt8(truncatingIfNeeded: $0 * 31) }
        try await put(w, data, at: 65536)
        reference.replaceSubrange(65536 ..< 196608, with: data)
        try await w.writeZeroes(at: 262144, length: 131072, flags: [])
        reference.replaceSubrange(262144 ..< 393216, with: [UInt8](repeating: 0, count: 131072))
        let c = try XCTUnwrap(w as? VMDKStreamWriter)
        try await c.commit(durable: false)
        try Data(file.contents().prefix(Int(c.usedFileSize))).write(to: URL(fileURLWithPath: name))
        let check = try Oracle.run("qemu-img", ["check", name], in: dir)
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        let ref = path("ref.raw")
        try Data(reference).write(to: URL(fileURLWithPath: ref))
        let cmp = try Oracle.run("qemu-img", ["compare", "-f", "raw", "-F", "vmdk", ref, name], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
    }

    func testStreamRefusesWritesOutOfOrder() async throws {
        let name = path("o.vmdk")
        let opts = ["subformat": "streamOptimized"]
        let file = MemoryDevice(name: name, size: try VMDKFormat.initialFileSize(for: 1 << 20, options: opts))
        let w = try await VMDKFormat.create(file: file, size: 1 << 20, options: opts, context: CreateContext(location: name))
        try await put(w, [UInt8](repeating: 1, count: 131072), at: 262144)
        do {
            try await put(w, [UInt8](repeating: 2, count: 65536), at: 0)
            XCTFail("a write behind the last one was taken")
        } catch let e as FerryError {
            XCTAssertTrue(e.message.contains("out of order"), e.message)
            XCTAssertEqual(e.path, name)
        }
    }
}
