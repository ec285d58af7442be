import Foundation
import XCTest

/// Writing qcow2: `ferry create -f qcow2`, `convert -O qcow2` with every `-o` option, `-c`,
/// `-B`, judged by qemu-img (check, compare, info, map); bad input; the incomplete marker a
/// killed conversion leaves; a target filesystem that fills up.
final class QCOW2WriteTests: XCTestCase {
    var dir: URL!
    var mountPoint: String?

    override func setUpWithError() throws { dir = try makeScratchDirectory("qcow2w") }
    override func tearDownWithError() throws {
        if let mountPoint { _ = try? Tools.run("/bin/umount", [mountPoint], in: dir) }
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// 8 MiB of data (patterns, a copy of a real binary: partly compressible), zeros written
    /// as data, and holes.
    func rawSource() throws -> String {
        let src = try TestImage(name: "src.raw", size: 8 << 20, writes: [
            "write -P 0x11 0 1M", "write -P 0x22 1536k 100k", "write -z 3M 512k", "write -P 0x33 7M 1M",
        ]).build(in: dir)
        // A real binary in the middle: compressible, but not trivially.
        let bin = try Data(contentsOf: URL(fileURLWithPath: try Tools.require("qemu-img"))).prefix(2 << 20)
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: src))
        try h.seek(toOffset: 4 << 20)
        try h.write(contentsOf: bin)
        try h.close()
        return src
    }

    /// Runs `qemu-img check` and fails the test unless it is clean with no leaks.
    @discardableResult
    func checkClean(_ image: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try Tools.run(try Tools.require("qemu-img"), ["check", image], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img check \(what): \(r.stdout) \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stdout.contains("No errors were found on the image."), "\(what): \(r.stdout)", file: file, line: line)
        XCTAssertFalse(r.stdout.lowercased().contains("leak"), "\(what): \(r.stdout)", file: file, line: line)
        return r.stdout
    }

    func assertIdentical(_ a: String, _ b: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Tools.run(try Tools.require("qemu-img"), ["compare", a, b], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img compare \(what): \(r.stdout) \(r.stderr)", file: file, line: line)
    }

    func json(_ text: String) throws -> [String: Any] {
        try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
    }

    // MARK: - create

    func testCreateMakesWhatInfoReads() throws {
        let cases: [(String, [String: String])] = [
            ("", ["compat": "1.1", "compression-type": "zlib", "cluster": "65536", "refcount-bits": "16", "extended-l2": "false", "lazy-refcounts": "false"]),
            ("compat=0.10,cluster_size=4k", ["compat": "0.10", "cluster": "4096", "refcount-bits": "16"]),
            ("compression_type=zstd,refcount_bits=1,lazy_refcounts=on", ["compression-type": "zstd", "refcount-bits": "1", "lazy-refcounts": "true"]),
            ("extended_l2=on,cluster_size=128k,refcount_bits=64", ["extended-l2": "true", "cluster": "131072", "refcount-bits": "64"]),
            ("cluster_size=2M,preallocation=metadata", ["cluster": "2097152"]),
            ("preallocation=falloc", [:]),
            ("preallocation=full", [:]),
        ]
        for (i, (options, want)) in cases.enumerated() {
            let name = "c\(i).qcow2"
            var args = ["create", "-f", "qcow2"]
            if !options.isEmpty { args += ["-o", options] }
            let r = try Tools.ferry(args + [name, "10M"], in: dir)
            XCTAssertEqual(r.status, 0, "\(options): \(r.stderr)")
            try checkClean(path(name), "create -o \(options)")
            let info = try json(try Tools.must("qemu-img", ["info", "--output=json", name], in: dir))
            XCTAssertEqual(info["virtual-size"] as? Int, 10 << 20, options)
            XCTAssertEqual(info["format"] as? String, "qcow2")
            let data = ((info["format-specific"] as? [String: Any])?["data"] as? [String: Any]) ?? [:]
            for (k, v) in want {
                if k == "cluster" {
                    XCTAssertEqual(info["cluster-size"].map { "\($0)" }, v, "\(options): cluster-size")
                } else {
                    XCTAssertEqual(data[k].map { "\($0)" }.map { $0 == "0" ? "false" : $0 == "1" && k != "refcount-bits" ? "true" : $0 }, v, "\(options): \(k)")
                }
            }
            if options.contains("preallocation") {
                // Every cluster mapped.
                let map = try Tools.must("qemu-img", ["map", "--output=json", name], in: dir)
                XCTAssertFalse(map.contains("\"data\": false"), "\(options): \(map)")
            }
        }
        // A backing file, the size taken from it, the backing format probed.
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", "3M"], in: dir)
        let r = try Tools.ferry(["create", "-f", "qcow2", "-b", "base.qcow2", "over.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try checkClean(path("over.qcow2"), "overlay")
        let info = try json(try Tools.must("qemu-img", ["info", "--output=json", "over.qcow2"], in: dir))
        XCTAssertEqual(info["virtual-size"] as? Int, 3 << 20)
        XCTAssertEqual(info["backing-filename"] as? String, "base.qcow2")
        XCTAssertEqual(info["backing-filename-format"] as? String, "qcow2")
        // Raw still works, with its options.
        let raw = try Tools.ferry(["create", "-f", "raw", "-o", "preallocation=full", "r.raw", "1M"], in: dir)
        XCTAssertEqual(raw.status, 0, raw.stderr)
        XCTAssertEqual(fileSize(path("r.raw")), 1 << 20)
        XCTAssertEqual(allocatedBytes(path("r.raw")), 1 << 20)
    }

    // MARK: - convert

    func testConvertWithEveryOption() throws {
        let src = try rawSource()
        // A qcow2 source too (compressed clusters, zero clusters, holes).
        try Tools.must("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", src, "srcc.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -z 0 64k", "srcc.qcow2"], in: dir)
        let optionSets = [
            "", "compat=0.10", "cluster_size=4k", "cluster_size=2M", "extended_l2=on", "extended_l2=on,cluster_size=16k",
            "refcount_bits=1", "refcount_bits=4", "refcount_bits=64", "lazy_refcounts=on", "compression_type=zstd",
            "preallocation=metadata", "preallocation=falloc", "preallocation=full", "compat=0.10,cluster_size=512",
        ]
        for (n, options) in optionSets.enumerated() {
            for compress in [false, true] where !(compress && options.hasPrefix("preallocation")) {
                for (k, source) in [src, path("srcc.qcow2")].enumerated() where k == 0 || n % 3 == 0 {
                    let out = "o-\(n)-\(compress)-\(k).qcow2"
                    var args = ["convert", "-q", "-O", "qcow2"]
                    if compress { args.append("-c") }
                    if !options.isEmpty { args += ["-o", options] }
                    let what = "\(options) \(compress ? "-c" : "") from \(source)"
                    let r = try Tools.ferry(args + [source, out], in: dir)
                    XCTAssertEqual(r.status, 0, "\(what): \(r.stderr)")
                    let check = try checkClean(path(out), what)
                    try assertIdentical(source, path(out), what)
                    if compress {
                        let m = check.range(of: #"([0-9.]+)% compressed clusters"#, options: .regularExpression)
                        let pct = m.map { Double(check[$0].split(separator: "%")[0]) ?? 0 } ?? 0
                        XCTAssertGreaterThan(pct, 50, "\(what): \(check)")
                    } else {
                        XCTAssertTrue(check.contains("0.00% compressed clusters"), "\(what): \(check)")
                    }
                    if !options.hasPrefix("preallocation") && !options.contains("2M") {
                        // Nothing allocated for the holes: at most the data and metadata.
                        XCTAssertLessThan(allocatedBytes(path(out)), 7 << 20, what)
                    }
                }
            }
        }
    }

    /// An image whose size is not a whole number of clusters: its short last cluster is
    /// compressed as qemu reads it (inflating to a whole cluster), in both compression types.
    func testCompressedShortLastCluster() throws {
        let size = (3 << 20) + 1536
        let src = try TestImage(name: "odd.raw", size: Int64(size), writes: [
            "write -P 0x11 0 64k", "write -P 0x5c \(3 << 20) 1536",
        ]).build(in: dir)
        for extra in [["-c"], ["-c", "-o", "compression_type=zstd"], ["-c", "-o", "cluster_size=4k"]] {
            let out = path("odd.qcow2")
            try? FileManager.default.removeItem(atPath: out)
            let r = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "qcow2"] + extra + [src, out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            try checkClean(out, "\(extra)")
            try assertIdentical(src, out, "\(extra)")
        }
    }

    func testRoundTripThroughFerry() throws {
        let src = try rawSource()
        for extra in [[], ["-c"], ["-c", "-o", "compression_type=zstd"], ["-o", "compat=0.10"]] {
            let q = path("rt.qcow2"), back = path("rt.raw")
            try? FileManager.default.removeItem(atPath: q)
            try? FileManager.default.removeItem(atPath: back)
            let a = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "qcow2"] + extra + [src, q], in: dir)
            XCTAssertEqual(a.status, 0, a.stderr)
            let b = try Tools.ferry(["convert", "-q", "-O", "raw", q, back], in: dir)
            XCTAssertEqual(b.status, 0, b.stderr)
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: src)), try Data(contentsOf: URL(fileURLWithPath: back)), "\(extra)")
            // Ferry's own info reads the image, and it is not dirty or incomplete.
            let info = try Tools.ferry(["info", q], in: dir)
            XCTAssertEqual(info.status, 0, info.stderr)
        }
    }

    // MARK: - overlays

    func testOverlayWithBackingFile() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", "16M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 8M 2M", "base.qcow2"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 3 1M 64k", "-c", "write -z 2M 1M", "-c", "write -P 4 12M 1M", "top.qcow2"], in: dir)
        try Tools.must("qemu-img", ["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "top.qcow2", "qemu.qcow2"], in: dir)
        let qemuMap = try Tools.must("qemu-img", ["map", "--output=json", "qemu.qcow2"], in: dir)
        func topRuns(_ map: String) -> [String] {
            map.split(separator: "\n").filter { $0.contains("\"depth\": 0") }.map { line in
                String(line.replacingOccurrences(of: #", "offset": [0-9]+"#, with: "", options: .regularExpression))
            }
        }
        for extra in [[], ["-c"], ["-o", "extended_l2=on"]] {
            let out = "ov.qcow2"
            try? FileManager.default.removeItem(atPath: path(out))
            let r = try Tools.ferry(["convert", "-q", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"] + extra + ["top.qcow2", out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            try checkClean(path(out), "-B \(extra)")
            try assertIdentical(path("top.qcow2"), path(out), "-B \(extra)")
            let map = try Tools.must("qemu-img", ["map", "--output=json", out], in: dir)
            XCTAssertEqual(topRuns(map), topRuns(qemuMap), "-B \(extra): what the overlay allocates")
            let info = try json(try Tools.must("qemu-img", ["info", "--output=json", out], in: dir))
            XCTAssertEqual(info["backing-filename"] as? String, "base.qcow2")
        }
        // A source not layered over the backing file: the overlay still reads as the source.
        let src = try rawSource()
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "base8.qcow2", "8M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 9 0 8M", "base8.qcow2"], in: dir)
        let r = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "qcow2", "-B", "base8.qcow2", src, "ov2.qcow2"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        try checkClean(path("ov2.qcow2"), "-B unrelated")
        try assertIdentical(src, path("ov2.qcow2"), "-B unrelated")
        for compat in ["0.10", "1.1"] {
            let out = "ov-\(compat).qcow2"
            let c = try Tools.ferry(["convert", "-q", "-O", "qcow2", "-o", "compat=\(compat)", "-B", "base.qcow2", "top.qcow2", out], in: dir)
            XCTAssertEqual(c.status, 0, c.stderr)
            try assertIdentical(path("top.qcow2"), path(out), "-B compat=\(compat)")
        }
    }

    /// 64 KiB data runs between 64 KiB holes (Ferry reads across such holes, from a raw file
    /// or from a qcow2 image's zero or unallocated clusters): the copies allocate what qemu-img's own copies
    /// allocate, as qcow2 and as raw, and read the same.
    func testFineGrainedHolesStayHoles() throws {
        let writes = (0 ..< 32).map { "write -P \($0 + 1) \($0 * 128)k 64k" } + ["write -P 0x5a 5M 1M"]
        let raw = try TestImage(name: "fine.raw", size: 8 << 20, writes: writes).build(in: dir)
        // The same guest bytes as qcow2, its holes zero clusters this time.
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "fine.qcow2", "8M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0 0 4M"] + writes.flatMap { ["-c", $0] } + ["fine.qcow2"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2"] + (0 ..< 32).flatMap { ["-c", "write -z \($0 * 128 + 64)k 64k"] } + ["fine.qcow2"], in: dir)
        let zeroClusters = try Tools.must("qemu-img", ["map", "--output=json", "fine.qcow2"], in: dir)
        XCTAssertTrue(zeroClusters.contains(#""zero": true, "data": false"#), "the qcow2 source has zero clusters")
        // And with unallocated clusters.
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, "sparse.qcow2"], in: dir)
        func runs(_ map: String) -> [String] {
            map.split(separator: "\n").map { String($0.replacingOccurrences(of: #", "offset": [0-9]+"#, with: "", options: .regularExpression)) }
        }
        for (src, fmt) in [(raw, "raw"), (path("fine.qcow2"), "qcow2"), (path("sparse.qcow2"), "qcow2")] {
            for out in ["qcow2", "raw"] {
                let name = URL(fileURLWithPath: src).deletingPathExtension().lastPathComponent
                let mine = "ferry-\(name).\(out)", theirs = "qemu-\(name).\(out)"
                let r = try Tools.ferry(["convert", "-f", fmt, "-O", out, src, mine], in: dir)
                XCTAssertEqual(r.status, 0, r.stderr)
                try Tools.must("qemu-img", ["convert", "-f", fmt, "-O", out, src, theirs], in: dir)
                try assertIdentical(src, path(mine), "\(fmt) -> \(out)")
                XCTAssertEqual(runs(try Tools.must("qemu-img", ["map", "--output=json", "-f", out, mine], in: dir)),
                               runs(try Tools.must("qemu-img", ["map", "--output=json", "-f", out, theirs], in: dir)),
                               "\(fmt) -> \(out): what the copy allocates")
                if out == "qcow2" { try checkClean(path(mine), "\(fmt) -> qcow2") }
                // 3 MiB of data; the holes between the first 2 MiB of it were read along.
                let read = r.stderr.range(of: #"read [0-9.]+ MiB"#, options: .regularExpression).map { String(r.stderr[$0]) }
                let mib = Double(read?.dropFirst(5).dropLast(4) ?? "") ?? 0
                XCTAssertGreaterThan(mib, 3.5, "\(fmt) -> \(out): \(r.stderr)")
            }
        }
    }

    // MARK: - bad input

    func testBadInputFailsBeforeWriting() throws {
        let src = try TestImage(name: "s.raw", size: 1 << 20, writes: ["write -P 1 0 64k"]).build(in: dir)
        let cases: [([String], String)] = [
            (["create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "x.qcow2", "1M"], "extended_l2"),
            (["create", "-f", "qcow2", "-o", "refcount_bits=3", "x.qcow2", "1M"], "refcount_bits"),
            (["create", "-f", "qcow2", "-o", "cluster_size=4M", "x.qcow2", "1M"], "cluster_size"),
            (["create", "-f", "qcow2", "-o", "cluster_size=256", "x.qcow2", "1M"], "cluster_size"),
            (["create", "-f", "qcow2", "-o", "compat=0.9", "x.qcow2", "1M"], "compat"),
            (["create", "-f", "qcow2", "-o", "bogus=1", "x.qcow2", "1M"], "bogus"),
            (["create", "-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "x.qcow2", "1M"], "compat"),
            (["create", "-f", "qcow2", "x.qcow2", "12Q"], "size"),
            (["create", "-f", "qcow2", "x.qcow2"], "size"),
            (["create", "-f", "qcow2", "-b", "missing.qcow2", "x.qcow2"], "missing.qcow2"),
            (["create", "-f", "raw", "-o", "preallocation=metadata", "x.qcow2", "1M"], "preallocation"),
            (["convert", "-c", "-O", "qcow2", "-o", "preallocation=full", src, "x.qcow2"], "preallocation"),
            (["convert", "-c", "-O", "raw", src, "x.qcow2"], "-c"),
            (["convert", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", src, "x.qcow2"], "extended_l2"),
            (["convert", "-O", "qcow2", "-o", "refcount_bits=12", src, "x.qcow2"], "refcount_bits"),
            (["convert", "-f", "raw", "-O", "qcow2", "-B", "missing.qcow2", src, "x.qcow2"], "missing.qcow2"),
            (["convert", "-O", "raw", "-B", src, src, "x.qcow2"], "-B"),
        ]
        for (args, mention) in cases {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            XCTAssertFalse(r.signalled)
            let lines = r.stderr.split(separator: "\n").filter { !$0.contains("warning") }
            XCTAssertGreaterThanOrEqual(lines.count, 1, "\(args)")
            XCTAssertTrue(lines.first?.hasPrefix("ferry: ") ?? false, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(mention), "\(args): should mention \(mention): \(r.stderr)")
            XCTAssertFalse(fileExists(path("x.qcow2")), "\(args): something was written")
        }
    }

    // MARK: - interruption

    func testKilledConversionLeavesIncompleteMarker() throws {
        let src = try TestImage(name: "big.raw", size: 256 << 20, writes: ["write -P 0x5a 0 200M"]).build(in: dir)
        let dst = path("killed.qcow2")
        let p = try Tools.start(try Tools.require("ferry"),
                                ["convert", "--progress=json", "-f", "raw", "-O", "qcow2", "-m", "1", "--buffer-size", "64k",
                                 "-t", "writethrough", src, dst], in: dir)
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline && p.process.isRunning && !p.stdoutSoFar.contains("\"final\":false") { usleep(20_000) }
        guard p.process.isRunning else { throw XCTSkip("the copy finished too fast to interrupt") }
        usleep(200_000)
        p.signal(SIGKILL)
        let r = try p.wait(timeout: 10)
        XCTAssertTrue(r.signalled)
        // Nothing under the target's name; what was written is in plain sight beside it, and
        // even that says it is incomplete.
        XCTAssertFalse(fileExists(dst), "the image gets its name only when it is complete")
        let partial = dst + ".ferry-partial"
        XCTAssertTrue(fileExists(partial), "a killed ferry cannot remove its partial file")
        let check = try Tools.run(try Tools.require("qemu-img"), ["check", partial], in: dir)
        XCTAssertNotEqual(check.status, 0)
        XCTAssertTrue(check.stderr.contains("ferry: conversion incomplete"), check.stderr)
        let info = try Tools.ferry(["info", partial], in: dir)
        XCTAssertEqual(info.status, 1)
        XCTAssertTrue(info.stderr.contains("incomplete"), info.stderr)
        // A clean conversion of the same thing has no marker.
        let ok = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "qcow2", src, "ok.qcow2"], in: dir, timeout: 120)
        XCTAssertEqual(ok.status, 0, ok.stderr)
        try checkClean(path("ok.qcow2"), "uninterrupted")
    }

    func testNoSpaceLeftRemovesTarget() throws {
        let mnt = path("tiny")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let m = try Tools.run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], in: dir)
        guard m.status == 0 else { throw XCTSkip("cannot mount a tmpfs here: \(m.stderr)") }
        mountPoint = mnt
        let src = try TestImage(name: "data.raw", size: 16 << 20, writes: []).build(in: dir)
        // Random bytes: they do not compress, so -c fills the 1 MiB filesystem too.
        var noise = Data(count: 4 << 20)
        noise.withUnsafeMutableBytes { p in for k in 0 ..< p.count / 8 { p.storeBytes(of: UInt64.random(in: 0 ... .max), toByteOffset: k * 8, as: UInt64.self) } }
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: src))
        try h.seek(toOffset: 2 << 20)
        try h.write(contentsOf: noise)
        try h.close()
        for extra in [[], ["-c"]] {
            let dst = mnt + "/out.qcow2"
            let r = try Tools.ferry(["convert", "-f", "raw", "-O", "qcow2"] + extra + [src, dst], in: dir)
            XCTAssertEqual(r.status, 1, "\(extra)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, r.stderr)
            XCTAssertTrue(r.stderr.contains("No space left on device"), r.stderr)
            XCTAssertFalse(fileExists(dst), "the failed target was not removed")
        }
    }
}
