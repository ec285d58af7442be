import FerryConvert
import FerryCore
import FerryFormats
import Foundation
import XCTest

/// qcow2 images made by qemu-img and qemu-io, read by Ferry and judged against what qemu-img
/// converts them to (bytes), and what qemu-img map says (extents, depth, host offsets).
final class QCOW2ReadTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try scratchDirectory("qcow2") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func p(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Reads `path` whole and in odd pieces, compares with qemu-img convert; compares the
    /// extents and `Images.map` with qemu-img map.
    func check(_ path: String, file: StaticString = #filePath, line: UInt = #line) async throws {
        let reference = try Oracle.reference(path, in: dir)
        let qmap = try Oracle.map(path, in: dir)
        try await withOpened(path) { image in
            XCTAssertEqual(image.format, "qcow2", file: file, line: line)
            XCTAssertTrue(image.device is LayeredDevice, file: file, line: line)
            let data = try await readAll(image.device)
            XCTAssertEqual(data.count, reference.count, "size of \(path)", file: file, line: line)
            if data != reference {
                let first = zip(data, reference).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? -1
                XCTFail("\(path): bytes differ from qemu-img convert, first at \(first)", file: file, line: line)
            }
            // Unaligned pieces: partial clusters, partial compressed clusters, across the end.
            var rng = SplitMix(seed: UInt64(reference.count))
            for _ in 0 ..< 24 where reference.count > 2 {
                let a = Int(rng.next() % UInt64(reference.count - 1))
                let n = 1 + Int(rng.next() % UInt64(min(reference.count - a, 300_000)))
                let got = try await image.device.read(at: Int64(a), count: n)
                XCTAssertEqual(Data(got), reference[a ..< a + n], "\(path): read \(a)+\(n)", file: file, line: line)
            }
            // Every extent agrees with qemu-img map about data versus zeros.
            for entry in qmap {
                let start = (entry["start"] as! NSNumber).int64Value
                let length = (entry["length"] as! NSNumber).int64Value
                let isData = entry["data"] as! Bool
                guard length > 0 else { continue }
                try await image.device.forEachExtent(in: start ..< start + length) { e in
                    if isData {
                        XCTAssertEqual(e.kind, .data, "\(path): extent \(e) where qemu-img map says data", file: file, line: line)
                    } else {
                        XCTAssertNotEqual(e.kind, .data, "\(path): extent \(e) where qemu-img map says zeros", file: file, line: line)
                    }
                }
            }
        }
        // ferry map agrees field by field.
        let (entries, _) = try await Images.map(ImageSpec(path))
        XCTAssertEqual(entries.count, qmap.count, "\(path): map entries \(entries) vs \(qmap)", file: file, line: line)
        for (e, q) in zip(entries, qmap) {
            let qOffset = (q["offset"] as? NSNumber)?.int64Value
            let same = e.start == (q["start"] as! NSNumber).int64Value && e.length == (q["length"] as! NSNumber).int64Value
                && e.depth == (q["depth"] as! NSNumber).intValue && e.present == (q["present"] as! Bool)
                && e.zero == (q["zero"] as! Bool) && e.data == (q["data"] as! Bool) && e.offset == qOffset
            XCTAssertTrue(same, "\(path): map entry \(e) vs qemu-img \(q)", file: file, line: line)
        }
    }

    // MARK: - versions, cluster sizes, cluster kinds

    func testVersion2() async throws {
        let path = try Oracle.qcow2("v2.qcow2", size: "3000000", options: "compat=0.10",
                                    writes: ["write -P 0x11 0 100k", "write -P 0x22 1M 64k", "write -P 0x33 2999808 192", "write -z 1M 4k"], in: dir)
        try await check(path)
    }

    func testClusterSizesAndOddVirtualSizes() async throws {
        for (bits, size) in [(512, "1049088"), (4096, "5000192"), (65536, "3145216"), (2 << 20, "5243392")] {
            let name = "c\(bits).qcow2"
            let path = try Oracle.qcow2(name, size: size, options: "cluster_size=\(bits)",
                                        writes: ["write -P 0xa1 0 1536", "write -P 0xa2 700k 300k", "write -P 0xa3 1024k 512"], in: dir)
            try await check(path)
        }
    }

    func testZeroClustersWithAndWithoutAllocationAndDiscard() async throws {
        let path = try Oracle.qcow2("zero.qcow2", size: "8M", writes: [
            "write -P 0x55 0 4M",
            "write -z 64k 128k",      // zero flag, allocation kept
            "write -z -u 1M 256k",    // zero flag, unmapped
            "discard 2M 512k",        // unallocated again
            "write -z 6M 1M",         // zero where nothing was allocated
        ], in: dir)
        try await check(path)
        try await withOpened(path) { image in
            let layer = try await (image.device as! LayeredDevice).layerExtents(in: 0 ..< image.device.size)
            XCTAssertTrue(layer.contains { $0.kind == .zero && $0.offset == 64 << 10 })
            XCTAssertTrue(layer.contains { $0.kind == .unallocated })
        }
    }

    func testCompressedDeflateAndZstd() async throws {
        // Partly compressible data: text, a binary, and patterns, made into a raw file.
        var raw = Data()
        let words = "the quick brown fox jumps over the lazy dog 0123456789 ".data(using: .utf8)!
        while raw.count < 1 << 20 { raw.append(words) }
        if let bin = FileManager.default.contents(atPath: "/bin/ls") { raw.append(bin.prefix(2 << 20)) }
        var rng = SplitMix(seed: 7)
        raw.append(Data((0 ..< (600 << 10)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }))
        raw.append(Data(count: 333_333))
        try raw.write(to: URL(fileURLWithPath: p("src.raw")))
        for type in ["zlib", "zstd"] {
            for cs in ["4096", "65536", "2M"] {
                let out = "comp-\(type)-\(cs).qcow2"
                try Oracle.must("qemu-img", ["convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type),cluster_size=\(cs)", p("src.raw"), p(out)], in: dir)
                try await check(p(out))
            }
            // Compressed writes mixed with plain ones.
            let mixed = try Oracle.qcow2("mixed-\(type).qcow2", size: "3M", options: "compression_type=\(type)",
                                         writes: ["write -c -P 0x61 0 64k", "write -c -P 0x62 128k 128k", "write -P 0x63 192k 4k", "write -c -P 0x64 3080192 65536"], in: dir)
            try await check(mixed)
        }
    }

    func testExtendedL2Subclusters() async throws {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", p("base.qcow2"), "4M"], in: dir)
        try Oracle.io("base.qcow2", ["write -P 0xb1 0 4M"], in: dir)
        let path = try Oracle.qcow2("ext.qcow2", size: "4M", options: "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2", writes: [
            "write -P 0xe1 2k 2k",        // one subcluster of a 64k cluster
            "write -P 0xe2 10k 6k",       // across subclusters
            "write -z 32k 4k",            // zero subclusters
            "write -z -u 70k 2k",
            "write -P 0xe3 1M 64k",       // a whole cluster
            "write -c -P 0xe4 2M 64k",    // compressed: no subclusters
            "write -P 0xe5 3M 512",
        ], in: dir)
        try await check(path)
        // Without a backing file, unallocated subclusters read as zeros.
        let alone = try Oracle.qcow2("ext2.qcow2", size: "1M", options: "extended_l2=on,cluster_size=128k",
                                     writes: ["write -P 0xe6 8k 4k", "write -z 64k 12k", "write -P 0xe7 1020k 4k"], in: dir)
        try await check(alone)
    }

    func testEveryRefcountWidthLazyRefcountsAndDirtyBit() async throws {
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            let name = "rc\(bits).qcow2"
            let lazy = bits == 16 || bits == 1 ? ",lazy_refcounts=on" : ""
            let path = try Oracle.qcow2(name, size: "2M", options: "refcount_bits=\(bits)\(lazy)",
                                        writes: ["write -P 0x\(String(bits, radix: 16)) 64k 192k", "write -c -P 0x77 1M 64k"], in: dir)
            try await check(path)
        }
        // The dirty bit (left by a crash with lazy refcounts): still readable, and reported.
        let path = try Oracle.qcow2("dirty.qcow2", size: "2M", options: "lazy_refcounts=on", writes: ["write -P 0x44 0 1M"], in: dir)
        let patch = Patcher(path: path)
        try patch.u64(try patch.readU64(at: 72) | 1, at: 72)
        let reference = try Oracle.reference(path, in: dir)
        try await withOpened(path) { image in
            let data = try await readAll(image.device)
            XCTAssertEqual(data, reference)
            XCTAssertEqual((image.device as? DescribedDevice)?.details.dirty, true)
        }
    }

    // MARK: - backing chains

    func testBackingChainRelativePathsShortBackingAndDepth() async throws {
        let sub = dir.appendingPathComponent("sub")
        try FileManager.default.createDirectory(at: sub, withIntermediateDirectories: true)
        // base.raw (2 MiB + 512) <- sub/mid.qcow2 (5 MiB) <- top.qcow2 (7 MiB), relative names.
        try Oracle.must("qemu-img", ["create", "-q", "-f", "raw", p("base.raw"), "2097664"], in: dir)
        try Oracle.io("base.raw", ["write -P 0x01 0 2097664"], format: "raw", in: dir)
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", p("sub/mid.qcow2"), "5M"], in: dir)
        try Oracle.io("sub/mid.qcow2", ["write -P 0x02 1M 64k", "write -P 0x03 3M 64k", "write -z 128k 64k"], in: dir)
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", p("top.qcow2"), "7M"], in: dir)
        try Oracle.io("top.qcow2", ["write -P 0x04 1M 4k", "write -P 0x05 6M 64k", "write -z 0 64k"], in: dir)
        try await check(p("top.qcow2"))
        try await withOpened(p("top.qcow2")) { image in
            let top = image.device as! LayeredDevice
            let mid = try XCTUnwrap(top.backing as? LayeredDevice)
            XCTAssertNotNil(mid.backing)
            XCTAssertEqual(mid.backing?.size, 2097664)
            // This layer alone: data at 1M (4 KiB written, the cluster copied up from the
            // backing file) and 6M, zero at 0, unallocated elsewhere.
            let layer = try await top.layerExtents(in: 0 ..< top.size)
            XCTAssertEqual(layer.filter { $0.kind == .data }.map(\.length).reduce(0, +), 128 << 10)
            XCTAssertEqual(layer.first?.kind, .zero)
            // The whole chain: past the raw base and mid's own data, nothing holds data.
            let whole = try await top.extents(in: 2097664 ..< 3 << 20)
            XCTAssertTrue(whole.allSatisfy { $0.kind != .data }, "\(whole)")
            XCTAssertEqual(image.warnings, [])
        }
    }

    func testBackingWithoutFormatIsProbedAndWarnedAbout() async throws {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "raw", p("base.img"), "1M"], in: dir)
        try Oracle.io("base.img", ["write -P 0x0b 0 1M"], format: "raw", in: dir)
        let path = try Oracle.qcow2("over.qcow2", size: "1M", options: "backing_file=base.img,backing_fmt=raw",
                                    writes: ["write -P 0x0c 64k 64k"], in: dir)
        // Turn the backing format extension into an unknown one: no format in the header now.
        let patch = Patcher(path: path)
        var pos = Int64(try patch.readU32(at: 100))
        while true {
            let type = try patch.readU32(at: pos)
            let length = Int64(try patch.readU32(at: pos + 4))
            if type == 0 { XCTFail("no backing format extension found"); return }
            if type == 0xE279_2ACA { try patch.u32(0x1234_5678, at: pos); break }
            pos += 8 + (length + 7) / 8 * 8
        }
        let reference = try Oracle.reference(path, in: dir)
        try await withOpened(path) { image in
            let data = try await readAll(image.device)
            XCTAssertEqual(data, reference)
            XCTAssertEqual(image.warnings.count, 1)
            XCTAssertTrue(image.warnings.first?.contains("probing guessed raw") ?? false, "\(image.warnings)")
            XCTAssertNil((image.device as? DescribedDevice)?.details.backingFormat)
        }
        // And the warning reaches convert's warning callback.
        let warnings = WarningBox()
        var options = ConvertOptions()
        options.targetCache = .unsafe
        _ = try await convert(sources: [ImageSpec(path)], target: ImageSpec(p("out.raw")), options: options,
                              warning: { warnings.add($0) })
        XCTAssertTrue(warnings.all.contains { $0.contains("base.img") && $0.contains("guessed raw") }, "\(warnings.all)")
        try Oracle.must("qemu-img", ["compare", "-F", "raw", path, p("out.raw")], in: dir)
    }

    func testBackingChainThatLoopsIsRefused() async throws {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", p("a.qcow2"), "1M"], in: dir)
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", p("b.qcow2"), "1M"], in: dir)
        try Oracle.must("qemu-img", ["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", p("a.qcow2")], in: dir)
        do {
            _ = try await withOpened(p("b.qcow2")) { _ in }
            XCTFail("a loop was opened")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .corrupt)
            XCTAssertTrue(e.description.contains("loops back"), e.description)
        }
    }

    func testBackingChainDeeperThanTheLimitIsRefused() async throws {
        try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", p("l0.qcow2"), "64k"], in: dir)
        for i in 1 ... Images.maxChainDepth + 1 {
            try Oracle.must("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", "l\(i - 1).qcow2", "-F", "qcow2", p("l\(i).qcow2"), "64k"], in: dir)
        }
        do {
            _ = try await withOpened(p("l\(Images.maxChainDepth + 1).qcow2")) { _ in }
            XCTFail("a chain deeper than the limit was opened")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .corrupt)
            XCTAssertTrue(e.description.contains("deeper than"), e.description)
        }
        // One less is fine.
        try await withOpened(p("l\(Images.maxChainDepth).qcow2")) { image in
            XCTAssertEqual(image.device.size, 64 << 10)
        }
    }

    // MARK: - external data file, snapshots, bitmaps, encryption

    func testExternalDataFile() async throws {
        let plain = try Oracle.qcow2("df.qcow2", size: "3M", options: "data_file=df.data",
                                     writes: ["write -P 0xd1 0 64k", "write -P 0xd2 1M 1M", "write -z 1088k 64k"], in: dir)
        try await check(plain)
        let raw = try Oracle.qcow2("dfr.qcow2", size: "3M", options: "data_file=dfr.data,data_file_raw=on",
                                   writes: ["write -P 0xd3 4k 64k", "write -P 0xd4 2M 4k"], in: dir)
        try await check(raw)
        try await withOpened(raw) { image in
            let d = (image.device as! DescribedDevice).details
            guard case .object(let top)? = d.formatSpecific, case .object(let data)? = top.first(where: { $0.0 == "data" })?.1 else {
                return XCTFail("no format-specific data")
            }
            XCTAssertTrue(data.contains { $0.0 == "data-file" && $0.1 == .string("dfr.data") })
            XCTAssertTrue(data.contains { $0.0 == "data-file-raw" && $0.1 == .bool(true) })
        }
    }

    func testInternalSnapshotsAndBitmapsReadTheActiveLayer() async throws {
        let path = try Oracle.qcow2("snap.qcow2", size: "2M", writes: ["write -P 0x01 0 1M"], in: dir)
        try Oracle.must("qemu-img", ["snapshot", "-c", "first", path], in: dir)
        try Oracle.io("snap.qcow2", ["write -P 0x02 512k 1M"], in: dir)
        try Oracle.must("qemu-img", ["snapshot", "-c", "second", path], in: dir)
        try Oracle.must("qemu-img", ["bitmap", "--add", path, "dirty0"], in: dir)
        try Oracle.io("snap.qcow2", ["write -P 0x03 1536k 64k", "discard 0 64k"], in: dir)
        try await check(path)
        try await withOpened(path) { image in
            let d = (image.device as! DescribedDevice).details
            XCTAssertEqual(d.snapshots.map(\.name), ["first", "second"])
            guard case .object(let top)? = d.formatSpecific, case .object(let data)? = top.first(where: { $0.0 == "data" })?.1 else {
                return XCTFail("no format-specific data")
            }
            XCTAssertTrue(data.contains { $0.0 == "bitmaps" }, "\(data)")
        }
    }

    func testEncryptedImagesAreRefused() async throws {
        // A real LUKS image. qemu-img times its key derivation and, on a busy machine, may
        // find too little CPU time to measure: try a few times.
        var made = false
        for _ in 0 ..< 3 where !made {
            let r = try Oracle.run("qemu-img", ["create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=secret",
                                                "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100", p("enc.qcow2"), "1M"], in: dir)
            made = r.status == 0
        }
        XCTAssertTrue(made, "qemu-img could not create a LUKS image")
        // An image marked with the legacy AES method (crypt_method 1).
        let aes = try Oracle.qcow2("aes.qcow2", size: "1M", writes: ["write -P 1 0 64k"], in: dir)
        try Patcher(path: aes).u32(1, at: 32)
        for (path, method) in [(p("enc.qcow2"), "LUKS"), (aes, "AES")] where fileExists(path) {
            do {
                _ = try await withOpened(path) { _ in }
                XCTFail("an encrypted image was opened")
            } catch let e as FerryError {
                XCTAssertEqual(e.code, .notSupported)
                XCTAssertTrue(e.description.contains("encryption is not supported"), e.description)
                XCTAssertTrue(e.description.contains(method), e.description)
                XCTAssertEqual(e.path, path)
            }
        }
    }

    // MARK: - speed and the cache

    func testHugeSparseImageMapsQuickly() async throws {
        let path = try Oracle.qcow2("huge.qcow2", size: "1T", writes: [
            "write -P 0x31 0 1M", "write -P 0x32 500G 1M", "write -P 0x33 1099510579200 1M",
        ], in: dir)
        let started = Date()
        try await withOpened(path) { image in
            var dataBytes: Int64 = 0
            var extents = 0
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { e in
                extents += 1
                if e.kind == .data { dataBytes += e.length }
            }
            XCTAssertEqual(dataBytes, 3 << 20)
            XCTAssertLessThan(extents, 10)
            let last = try await image.device.read(at: 1_099_510_579_200, count: 4096)
            XCTAssertTrue(last.allSatisfy { $0 == 0x33 })
        }
        XCTAssertLessThan(Date().timeIntervalSince(started), 3, "mapping a 1 TiB image took too long")
    }

    func testL2TablesLoadOnceAndTheCacheStaysBounded() async throws {
        // 512-byte clusters: one L2 table maps 32 KiB, so 40 MiB of data needs 1280 tables.
        let path = try Oracle.qcow2("many.qcow2", size: "40M", options: "cluster_size=512", writes: ["write -P 0x42 0 40M"], in: dir)
        try await withOpened(path) { image in
            let q = try XCTUnwrap(image.device as? QCOW2Device)
            // Sixteen concurrent reads inside one table's range: one load.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for i in 0 ..< 16 {
                    group.addTask { _ = try await q.read(at: Int64(i) * 2048, count: 2048) }
                }
                try await group.waitForAll()
            }
            XCTAssertEqual(q.l2TablesLoaded, 1)
            let data = try await readAll(q, chunk: 256 << 10)
            XCTAssertTrue(data.allSatisfy { $0 == 0x42 })
            XCTAssertGreaterThanOrEqual(q.l2TablesLoaded, 1280)
            XCTAssertLessThanOrEqual(q.l2TablesCached, q.l2CacheCapacity)
            XCTAssertLessThan(q.l2CacheCapacity, 1280)
        }
    }

    /// One read that spans several data runs between holes (a copy reads across short holes)
    /// reads the runs together: on a file that answers in 2 ms, all at once, not in turn.
    func testDataRunsOfOneReadAreReadTogether() async throws {
        let writes = (0 ..< 16).map { "write -P \($0 + 1) \($0 * 128)k 64k" }
        let path = try Oracle.qcow2("runs.qcow2", size: "2M", writes: writes, in: dir)
        let reference = try Oracle.reference(path, in: dir)
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let file = MemoryDevice(name: path, size: Int64(bytes.count), latency: .milliseconds(2))
        try await file.write(at: 0, bytes: bytes)
        let context = FormatContext(location: path, readOnly: true, openBacking: { location, _, _ in
            throw FerryError(.notSupported, "no backing file here", path: location)
        })
        let image = try await QCOW2Format.open(file: file, context: context)
        XCTAssertTrue(image.capabilities.contains(.cheapZeroReads), "no backing file: holes cost nothing")
        let before = file.operations.count
        let got = try await image.read(at: 0, count: 2 << 20)
        XCTAssertEqual(Data(got), reference)
        let clusterReads = file.operations[before...].filter { if case .read(_, 65536) = $0 { true } else { false } }
        XCTAssertEqual(clusterReads.count, 1 + 16, "the L2 table, then each run")
        XCTAssertGreaterThanOrEqual(file.peakInFlight, 16, "the 16 runs were read at once")
    }

    func testDirectIOSourceAndProbedFormat() async throws {
        let path = try Oracle.qcow2("direct.qcow2", size: "3M", options: "compression_type=zstd",
                                    writes: ["write -P 0x71 0 1M", "write -c -P 0x72 1M 64k", "write -P 0x73 2M 512"], in: dir)
        let reference = try Oracle.reference(path, in: dir)
        try await withOpened(path, options: EndpointOptions(cache: .none)) { image in
            XCTAssertEqual(image.format, "qcow2")
            XCTAssertFalse(image.probedAsRaw)
            let data = try await readAll(image.device)
            XCTAssertEqual(data, reference)
        }
    }

    func testLibraryConvertMatchesQemu() async throws {
        let path = try Oracle.qcow2("conv.qcow2", size: "9000000", options: "cluster_size=16k,compression_type=zstd", writes: [
            "write -P 0x91 0 2M", "write -c -P 0x92 4M 64k", "write -z 6M 1M", "write -P 0x93 8999936 64",
        ], in: dir)
        var options = ConvertOptions()
        options.targetCache = .unsafe
        _ = try await convert(sources: [ImageSpec(path, format: "qcow2")], target: ImageSpec(p("conv.raw")), options: options)
        try Oracle.must("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", path, p("conv.raw")], in: dir)
    }
}

func fileExists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

final class WarningBox: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func add(_ s: String) { lock.lock(); lines.append(s); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}

/// A small deterministic generator for test data and offsets.
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
