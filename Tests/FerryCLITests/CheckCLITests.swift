import Foundation
import XCTest

/// `ferry check` against `qemu-img check`: the same stdout, stderr and exit status on clean
/// qcow2 images from qemu-img and from every Ferry writer, and on images whose refcounts and
/// COPIED flags the tests break by editing their tables; repairs leave images qemu-img finds
/// clean, with the guest data unchanged.
final class CheckCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("check") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func qemu(_ args: [String]) throws { try Tools.must("qemu-img", args, in: dir) }
    func io(_ image: String, _ writes: [String], format: String = "qcow2") throws {
        try Tools.must("qemu-io", ["-f", format] + writes.flatMap { ["-c", $0] } + [image], in: dir)
    }

    /// Both tools on `image` (a copy each, as a repair changes it): stdout, stderr and status.
    func assertSameAsQemu(_ image: String, _ args: [String] = [], line: UInt = #line) throws {
        for output in ["human", "json"] {
            let mine = "f-\(image)", theirs = "q-\(image)"
            try? FileManager.default.removeItem(atPath: path(mine))
            try? FileManager.default.removeItem(atPath: path(theirs))
            try FileManager.default.copyItem(atPath: path(image), toPath: path(mine))
            try FileManager.default.copyItem(atPath: path(image), toPath: path(theirs))
            let q = try Tools.run(try Tools.require("qemu-img"), ["check", "--output=\(output)"] + args + [theirs], in: dir)
            let f = try Tools.ferry(["check", "--output=\(output)"] + args + [mine], in: dir)
            XCTAssertEqual(f.stdout, q.stdout.replacingOccurrences(of: theirs, with: mine), "\(image) \(args) \(output): stdout", line: line)
            // An error line is Ferry's ("ferry: FILE: ...") where qemu-img's says "qemu-img: ...".
            XCTAssertEqual(f.stderr, q.stderr.replacingOccurrences(of: "qemu-img: ", with: "ferry: \(mine): "),
                           "\(image) \(args) \(output): stderr", line: line)
            XCTAssertEqual(f.status, q.status, "\(image) \(args) \(output): status", line: line)
        }
    }

    // MARK: - editing an image's tables

    func u32(_ d: Data, _ at: Int) -> UInt64 { d[at ..< at + 4].reduce(0) { $0 << 8 | UInt64($1) } }
    func u64(_ d: Data, _ at: Int) -> UInt64 { d[at ..< at + 8].reduce(0) { $0 << 8 | UInt64($1) } }

    func poke(_ image: String, at offset: Int, _ value: UInt64, bytes: Int) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path(image)))
        try h.seek(toOffset: UInt64(offset))
        try h.write(contentsOf: Data((0 ..< bytes).map { UInt8(truncatingIfNeeded: value >> UInt64(8 * (bytes - 1 - $0))) }))
        try h.close()
    }

    /// Sets the stored refcount of `cluster` (16-bit refcounts).
    func setRefcount(_ image: String, cluster: Int, to value: UInt64) throws {
        let d = try Data(contentsOf: URL(fileURLWithPath: path(image)))
        let cs = 1 << Int(u32(d, 20))
        XCTAssertEqual(u32(d, 96), 4, "16-bit refcounts")
        let table = Int(u64(d, 48))
        let perBlock = cs / 2
        let block = Int(u64(d, table + 8 * (cluster / perBlock)))
        XCTAssertNotEqual(block, 0)
        try poke(image, at: block + 2 * (cluster % perBlock), value, bytes: 2)
    }

    /// Clears the COPIED flag of the first active L1 entry.
    func clearL1Copied(_ image: String) throws {
        let d = try Data(contentsOf: URL(fileURLWithPath: path(image)))
        let l1 = Int(u64(d, 40))
        try poke(image, at: l1, u64(d, l1) & ~(1 << 63), bytes: 8)
    }

    /// 64 MiB: data clusters 0-15 (cluster 5 is at file cluster 5), a compressed cluster.
    func base(_ name: String) throws -> String {
        try qemu(["create", "-q", "-f", "qcow2", path(name), "64M"])
        try io(path(name), ["write -P 1 0 1M", "write -c -P 2 4M 64k"])
        return name
    }

    // MARK: - tests

    func testCleanImagesMatchQemuImg() throws {
        var images: [String] = []
        try qemu(["create", "-q", "-f", "qcow2", path("empty.qcow2"), "1M"]); images.append("empty.qcow2")
        images.append(try base("plain.qcow2"))
        try qemu(["create", "-q", "-f", "qcow2", path("snap.qcow2"), "64M"])
        try io(path("snap.qcow2"), ["write -P 1 0 2M"])
        try qemu(["snapshot", "-c", "s1", path("snap.qcow2")])
        try io(path("snap.qcow2"), ["write -P 2 1M 2M"])
        try qemu(["snapshot", "-c", "s2", path("snap.qcow2")])
        try io(path("snap.qcow2"), ["write -P 3 10M 64k"]); images.append("snap.qcow2")
        try qemu(["create", "-q", "-f", "qcow2", path("bitmaps.qcow2"), "64M"])
        try io(path("bitmaps.qcow2"), ["write -P 1 0 2M"])
        try qemu(["bitmap", "--add", path("bitmaps.qcow2"), "b0"])
        try qemu(["bitmap", "--add", "-g", "64k", path("bitmaps.qcow2"), "b1"])
        try io(path("bitmaps.qcow2"), ["write -P 1 8M 2M"]); images.append("bitmaps.qcow2")
        for (name, options) in [("ext.qcow2", "extended_l2=on"), ("r1.qcow2", "refcount_bits=1"), ("r64.qcow2", "refcount_bits=64,cluster_size=4k"),
                                ("v2.qcow2", "compat=0.10"), ("zstd.qcow2", "compression_type=zstd"), ("df.qcow2", "data_file=df.raw")] {
            try qemu(["create", "-q", "-f", "qcow2", "-o", options, path(name), "64M"])
            try io(path(name), ["write -P 1 0 2M", "write -P 2 5M 4k", "write -z 7M 1M"])
            images.append(name)
        }
        // Every writer of Ferry's.
        try qemu(["create", "-q", "-f", "raw", path("src.raw"), "64M"])
        try io(path("src.raw"), ["write -P 1 0 3M", "write -P 2 9M 1M", "write -P 3 40M 64k"], format: "raw")
        for (name, args) in [("f-plain.qcow2", [String]()), ("f-zlib.qcow2", ["-c"]), ("f-zstd.qcow2", ["-c", "-o", "compression_type=zstd"]),
                             ("f-v2.qcow2", ["-o", "compat=0.10,cluster_size=4k"]), ("f-bitmaps.qcow2", ["--bitmaps"])] {
            let src = name == "f-bitmaps.qcow2" ? "bitmaps.qcow2" : "src.raw"
            let r = try Tools.ferry(["convert", "-q", "-O", "qcow2"] + args + [src, name], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            images.append(name)
        }
        try FileManager.default.copyItem(atPath: path("f-plain.qcow2"), toPath: path("f-changed.qcow2"))
        for c in [["snapshot", "-c", "one", "f-changed.qcow2"], ["resize", "f-changed.qcow2", "+64M"],
                  ["amend", "-o", "refcount_bits=4", "f-changed.qcow2"]] {
            XCTAssertEqual(try Tools.ferry(c, in: dir).status, 0, "\(c)")
        }
        images.append("f-changed.qcow2")
        for image in images {
            try assertSameAsQemu(image)
            XCTAssertEqual(try Tools.ferry(["check", image], in: dir).status, 0, image)
        }
    }

    func testLeaksAndCorruptionsMatchQemuImg() throws {
        // Refcounts above the references: leaks (and COPIED flags that no longer match).
        try setRefcount(try base("leak.qcow2"), cluster: 5, to: 2)
        try setRefcount("leak.qcow2", cluster: 6, to: 3)
        // A cluster past the old end of the file, counted but not used.
        let grown = try base("grown.qcow2")
        // The file ends inside its last (compressed) cluster.
        let end = (fileSize(path(grown)) + 65535) >> 16
        XCTAssertEqual(truncate(path(grown), off_t((end + 2) << 16)), 0)
        try setRefcount(grown, cluster: Int(end), to: 1)
        // A refcount below the references: a corruption.
        try setRefcount(try base("low.qcow2"), cluster: 5, to: 0)
        // An L2 table whose refcount is 1 but whose L1 entry lacks COPIED.
        try clearL1Copied(try base("copied.qcow2"))
        for image in ["leak.qcow2", "grown.qcow2", "low.qcow2", "copied.qcow2"] {
            try assertSameAsQemu(image)
        }
        XCTAssertEqual(try Tools.ferry(["check", "leak.qcow2"], in: dir).status, 2)
        XCTAssertEqual(try Tools.ferry(["check", "grown.qcow2"], in: dir).status, 3)
        XCTAssertEqual(try Tools.ferry(["check", "low.qcow2"], in: dir).status, 2)
    }

    func testRepairs() throws {
        try setRefcount(try base("leak.qcow2"), cluster: 5, to: 2)
        let grown = try base("grown.qcow2")
        // The file ends inside its last (compressed) cluster.
        let end = (fileSize(path(grown)) + 65535) >> 16
        XCTAssertEqual(truncate(path(grown), off_t((end + 2) << 16)), 0)
        try setRefcount(grown, cluster: Int(end), to: 1)
        try clearL1Copied(try base("copied.qcow2"))
        try setRefcount(try base("low.qcow2"), cluster: 5, to: 0)
        _ = try base("original.qcow2")
        // Leaks and COPIED flags: the same repair lines and reports as qemu-img's, either mode.
        for image in ["leak.qcow2", "grown.qcow2", "copied.qcow2"] {
            for mode in ["leaks", "all"] {
                try assertSameAsQemu(image, ["-r", mode])
                // assertSameAsQemu repaired f-IMAGE: qemu-img finds it clean, with the same data.
                let check = try Tools.run(try Tools.require("qemu-img"), ["check", "f-\(image)"], in: dir)
                XCTAssertEqual(check.status, 0, "\(image) -r \(mode): \(check.stdout)\(check.stderr)")
                try Tools.must("qemu-img", ["compare", "original.qcow2", "f-\(image)"], in: dir)
            }
        }
        // A refcount of 0 on a cluster in use: -r leaks stops, as qemu-img does; -r all
        // rebuilds the refcount structure where qemu-img puts it (the same lines, counts and
        // image end offset), and qemu-img then finds it clean, with the same data.
        try assertSameAsQemu("low.qcow2", ["-r", "leaks"])
        try assertSameAsQemu("low.qcow2", ["-r", "all"])
        XCTAssertEqual(try Tools.run(try Tools.require("qemu-img"), ["check", "f-low.qcow2"], in: dir).status, 0)
        try Tools.must("qemu-img", ["compare", "original.qcow2", "f-low.qcow2"], in: dir)
    }

    /// A rebuild with a leak beside it, free clusters in the middle of the file, and (at
    /// 512-byte clusters) eleven refcount blocks, all laid out as qemu-img lays them.
    func testRebuildingTheRefcountStructure() throws {
        try setRefcount(try base("mixed.qcow2"), cluster: 5, to: 0)
        try setRefcount("mixed.qcow2", cluster: 7, to: 2)
        try setRefcount("mixed.qcow2", cluster: 9, to: 0)
        try qemu(["create", "-q", "-f", "qcow2", path("holes.qcow2"), "64M"])
        try io(path("holes.qcow2"), ["write -P 1 0 2M", "write -P 3 8M 1M", "discard 64k 192k"])
        try setRefcount("holes.qcow2", cluster: 20, to: 0)
        try qemu(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path("small.qcow2"), "64M"])
        try io(path("small.qcow2"), ["write -P 1 0 1M", "write -P 3 8M 300k", "discard 4k 8k"])
        try setRefcount("small.qcow2", cluster: 100, to: 0)
        for image in ["mixed.qcow2", "holes.qcow2", "small.qcow2"] {
            try FileManager.default.copyItem(atPath: path(image), toPath: path("original-" + image))
            try assertSameAsQemu(image, ["-r", "all"])
            let after = try Tools.run(try Tools.require("qemu-img"), ["check", "f-\(image)"], in: dir)
            XCTAssertEqual(after.status, 0, "\(image): \(after.stdout)\(after.stderr)")
            try Tools.must("qemu-img", ["compare", "original-" + image, "f-\(image)"], in: dir)
        }
    }

    /// QED keeps no refcounts: clusters no table uses are leaks, and nothing is repaired.
    func testQEDImagesMatchQemuImg() throws {
        try qemu(["create", "-q", "-f", "qed", path("empty.qed"), "1M"])
        try qemu(["create", "-q", "-f", "qed", path("frag.qed"), "16M"])
        try io(path("frag.qed"), ["write -P 1 1M 64k", "write -P 2 0 64k", "write -z 4M 128k", "write -P 3 8M 64k"], format: "qed")
        try qemu(["create", "-q", "-f", "raw", path("src.raw"), "64M"])
        try io(path("src.raw"), ["write -P 1 0 3M", "write -P 2 9M 1M"], format: "raw")
        XCTAssertEqual(try Tools.ferry(["convert", "-q", "-O", "qed", "src.raw", "ferry.qed"], in: dir).status, 0)
        try FileManager.default.copyItem(atPath: path("ferry.qed"), toPath: path("leaky.qed"))
        XCTAssertEqual(truncate(path("leaky.qed"), off_t(fileSize(path("ferry.qed")) + (128 << 10))), 0)
        for image in ["empty.qed", "frag.qed", "ferry.qed", "leaky.qed"] { try assertSameAsQemu(image) }
        try assertSameAsQemu("leaky.qed", ["-r", "leaks"])
        XCTAssertEqual(try Tools.ferry(["check", "leaky.qed"], in: dir).status, 3)
    }

    /// VDI: block-map entries in range, none used twice, the header's count of blocks in use.
    func testVDIImagesMatchQemuImg() throws {
        try qemu(["create", "-q", "-f", "vdi", path("qemu.vdi"), "16M"])
        try io(path("qemu.vdi"), ["write -P 1 0 2M"], format: "vdi")
        try qemu(["create", "-q", "-f", "raw", path("src.raw"), "16M"])
        try io(path("src.raw"), ["write -P 1 0 3M", "write -P 2 9M 1M"], format: "raw")
        for (name, options) in [("dynamic.vdi", "static=off"), ("static.vdi", "static=on")] {
            XCTAssertEqual(try Tools.ferry(["convert", "-q", "-O", "vdi", "-o", options, "src.raw", name], in: dir).status, 0)
        }
        // The block map at 512 holds blocks 0 and 1 for guest blocks 0 and 1; the header
        // counts 2 blocks in use (at 0x184).
        let broken: [(String, Int, UInt32)] = [("too-large.vdi", 512 + 12, 100), ("unlisted.vdi", 512 + 12, 7),
                                               ("twice.vdi", 512 + 12, 1), ("count.vdi", 0x184, 5)]
        for (name, offset, value) in broken {
            try FileManager.default.copyItem(atPath: path("qemu.vdi"), toPath: path(name))
            let h = try FileHandle(forUpdating: URL(fileURLWithPath: path(name)))
            try h.seek(toOffset: UInt64(offset))
            try h.write(contentsOf: Data((0 ..< 4).map { UInt8(truncatingIfNeeded: value >> UInt32(8 * $0)) }))
            try h.close()
        }
        for image in ["qemu.vdi", "dynamic.vdi", "static.vdi"] + broken.map(\.0) {
            try assertSameAsQemu(image)
        }
        XCTAssertEqual(try Tools.ferry(["check", "twice.vdi"], in: dir).status, 2)
        // qemu-img cannot repair VDI: -r is a check it does not support (status 63).
        try assertSameAsQemu("count.vdi", ["-r", "all"])
    }

    /// Parallels: an image left open, BAT entries outside the file, space after the last cluster.
    func testParallelsImagesMatchQemuImg() throws {
        try qemu(["create", "-q", "-f", "parallels", path("empty.parallels"), "16M"])
        try qemu(["create", "-q", "-f", "parallels", path("base.parallels"), "16M"])
        try io(path("base.parallels"), ["write -P 1 0 2M"], format: "parallels")
        try qemu(["create", "-q", "-f", "parallels", "-o", "cluster_size=64k", path("frag.parallels"), "16M"])
        try io(path("frag.parallels"), ["write -P 1 0 64k", "write -P 2 128k 64k", "write -P 3 64k 64k", "write -P 4 1M 64k"], format: "parallels")
        // The BAT starts at 64 (clusters of 1 MiB, entries in clusters); in_use is at 44.
        let broken: [(String, Int, UInt32)] = [("outside.parallels", 64 + 8, 0x10_0000), ("open.parallels", 44, 0x746F_6E59)]
        for (name, offset, value) in broken {
            try FileManager.default.copyItem(atPath: path("base.parallels"), toPath: path(name))
            let h = try FileHandle(forUpdating: URL(fileURLWithPath: path(name)))
            try h.seek(toOffset: UInt64(offset))
            try h.write(contentsOf: Data((0 ..< 4).map { UInt8(truncatingIfNeeded: value >> UInt32(8 * $0)) }))
            try h.close()
        }
        try FileManager.default.copyItem(atPath: path("base.parallels"), toPath: path("leaky.parallels"))
        XCTAssertEqual(truncate(path("leaky.parallels"), off_t(fileSize(path("base.parallels")) + (2 << 20))), 0)
        for image in ["empty.parallels", "base.parallels", "frag.parallels", "leaky.parallels"] + broken.map(\.0) {
            try assertSameAsQemu(image)
        }
        // Repairs: leaked space cut off the end, the image marked closed, BAT entries outside the
        // file dropped (only with -r all), with qemu-img's lines; qemu-img then finds them clean.
        for image in ["base.parallels", "leaky.parallels", "open.parallels", "outside.parallels"] {
            for mode in ["leaks", "all"] {
                try assertSameAsQemu(image, ["-r", mode])
                let after = try Tools.run(try Tools.require("qemu-img"), ["check", "f-\(image)"], in: dir)
                XCTAssertEqual(after.status, mode == "all" || image == "leaky.parallels" || image == "base.parallels" ? 0 : 2,
                               "\(image) -r \(mode): \(after.stdout)\(after.stderr)")
            }
        }
        XCTAssertEqual(fileSize(path("f-leaky.parallels")), fileSize(path("base.parallels")), "the leaked space was cut off")
    }

    func testVMDKAndVHDXImagesMatchQemuImg() throws {
        try qemu(["create", "-q", "-f", "raw", path("src.raw"), "16M"])
        try io(path("src.raw"), ["write -P 1 0 3M", "write -P 2 9M 1M"], format: "raw")
        var images: [String] = []
        for sub in ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse", "monolithicFlat"] {
            try qemu(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", path("src.raw"), path("q-\(sub).vmdk")])
            XCTAssertEqual(try Tools.ferry(["convert", "-q", "-O", "vmdk", "-o", "subformat=\(sub)", "src.raw", "f-\(sub).vmdk"], in: dir).status, 0)
            images += ["q-\(sub).vmdk", "f-\(sub).vmdk"]
        }
        for sub in ["dynamic", "fixed"] {
            try qemu(["convert", "-q", "-f", "raw", "-O", "vhdx", "-o", "subformat=\(sub)", path("src.raw"), path("q-\(sub).vhdx")])
            XCTAssertEqual(try Tools.ferry(["convert", "-q", "-O", "vhdx", "-o", "subformat=\(sub)", "src.raw", "f-\(sub).vhdx"], in: dir).status, 0)
            images += ["q-\(sub).vhdx", "f-\(sub).vhdx"]
        }
        // A grain table entry (the 36th of the first table, after the header's gd_offset) and
        // a BAT entry (the first, at the BAT region's offset) pointing far past the end.
        try FileManager.default.copyItem(atPath: path("q-monolithicSparse.vmdk"), toPath: path("far.vmdk"))
        var d = try Data(contentsOf: URL(fileURLWithPath: path("far.vmdk")))
        func le(_ at: Int, _ n: Int) -> Int { (0 ..< n).reduce(0) { $0 | Int(d[at + $1]) << (8 * $1) } }
        let gt = le(le(56, 8) * 512, 4) * 512
        d.replaceSubrange(gt + 4 * 35 ..< gt + 4 * 36, with: [0x00, 0xff, 0xff, 0x7f])
        try d.write(to: URL(fileURLWithPath: path("far.vmdk")))
        try FileManager.default.copyItem(atPath: path("q-dynamic.vhdx"), toPath: path("far.vhdx"))
        d = try Data(contentsOf: URL(fileURLWithPath: path("far.vhdx")))
        let regions = 0x30000
        var bat = 0
        for i in 0 ..< le(regions + 8, 4) where d[regions + 16 + 32 * i] == 0x66 {  // 2DC27766-...: the BAT
            bat = le(regions + 16 + 32 * i + 16, 8)
        }
        XCTAssertNotEqual(bat, 0)
        let entry = UInt64(le(bat, 8)) & 0xFFFFF | UInt64(100_000) << 20
        d.replaceSubrange(bat ..< bat + 8, with: (0 ..< 8).map { UInt8(truncatingIfNeeded: entry >> UInt64(8 * $0)) })
        try d.write(to: URL(fileURLWithPath: path("far.vhdx")))
        for image in images + ["far.vmdk", "far.vhdx"] { try assertSameAsQemu(image) }
        XCTAssertEqual(try Tools.ferry(["check", "far.vmdk"], in: dir).status, 1)
        XCTAssertEqual(try Tools.ferry(["check", "far.vhdx"], in: dir).status, 2)
    }

    func testFormatsWithoutChecksAndBadArguments() throws {
        try qemu(["create", "-q", "-f", "raw", path("disk.raw"), "1M"])
        let raw = try Tools.ferry(["check", "-f", "raw", "disk.raw"], in: dir)
        XCTAssertEqual(raw.status, 63, "qemu-img's status for a format without checks")
        XCTAssertEqual(raw.stderr, "ferry: disk.raw: This image format does not support checks\n")
        try qemu(["convert", "-q", "-f", "raw", "-O", "vpc", path("disk.raw"), path("disk.vhd")])
        try assertSameAsQemu("disk.vhd")
        let bad = try Tools.ferry(["check", "-r", "some", "disk.raw"], in: dir)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("Unknown option for -r: 'some'"), bad.stderr)
        let missing = try Tools.ferry(["check", "nothere.qcow2"], in: dir)
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("nothere.qcow2"), missing.stderr)
    }
}
