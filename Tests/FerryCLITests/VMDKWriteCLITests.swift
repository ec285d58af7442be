import Foundation
import XCTest

/// Writing VMDK with the built `ferry`: `create -f vmdk` and `convert -O vmdk` in every
/// subformat, judged by qemu-img (check, compare, info) and libvmdk's vmdkinfo; the bytes of
/// a streamOptimized header; `-c`; bad options; a failed copy leaves no file behind.
final class VMDKWriteCLITests: XCTestCase {
    var dir: URL!
    var mountPoint: String?

    override func setUpWithError() throws { dir = try makeScratchDirectory("vmdkw") }
    override func tearDownWithError() throws {
        if let mountPoint { _ = try? Tools.run("/bin/umount", [mountPoint], in: dir) }
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    static let subformats = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]

    /// The files of each subformat for an image `name.vmdk` of 2 GiB and a bit (two extents).
    static func files(_ subformat: String, _ name: String) -> [String] {
        switch subformat {
        case "monolithicFlat": return ["\(name).vmdk", "\(name)-flat.vmdk"]
        case "twoGbMaxExtentSparse": return ["\(name).vmdk", "\(name)-s001.vmdk", "\(name)-s002.vmdk"]
        case "twoGbMaxExtentFlat": return ["\(name).vmdk", "\(name)-f001.vmdk", "\(name)-f002.vmdk"]
        default: return ["\(name).vmdk"]
        }
    }

    /// 2 GiB + 3 MiB, sparse: patterned data, a real binary (compressible, not trivially),
    /// random bytes (not compressible), zeros written as data, holes, and data across the
    /// 2 GiB extent boundary.
    func source() throws -> String {
        let src = try TestImage(name: "src.raw", size: (2 << 30) + (3 << 20), writes: [
            "write -P 0x11 0 1M", "write -P 0x22 1536k 100k", "write -z 3M 512k", "write -P 0x33 7M 1M",
            "write -P 0x44 2047M 2M", "write -P 0x55 2050M 64k",
        ]).build(in: dir)
        let bin = try Data(contentsOf: URL(fileURLWithPath: try Tools.require("qemu-img"))).prefix(2 << 20)
        var noise = Data(count: 1 << 20)
        noise.withUnsafeMutableBytes { p in for k in 0 ..< p.count / 8 { p.storeBytes(of: UInt64.random(in: 0 ... .max), toByteOffset: k * 8, as: UInt64.self) } }
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: src))
        try h.seek(toOffset: 4 << 20)
        try h.write(contentsOf: bin)
        try h.seek(toOffset: 100 << 20)
        try h.write(contentsOf: noise)
        try h.close()
        return src
    }

    func checkClean(_ image: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Tools.run(try Tools.require("qemu-img"), ["check", image], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img check \(what): \(r.stdout) \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stdout.contains("No errors were found on the image."), "\(what): \(r.stdout)", file: file, line: line)
    }

    func assertIdentical(_ a: String, _ b: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", "raw", "-F", "vmdk", a, b], in: dir)
        XCTAssertEqual(r.status, 0, "qemu-img compare \(what): \(r.stdout) \(r.stderr)", file: file, line: line)
    }

    func vmdkinfo(_ image: String, _ what: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try Tools.run(try Tools.require("vmdkinfo"), [image], in: dir)
        XCTAssertEqual(r.status, 0, "vmdkinfo \(what): \(r.stdout) \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    func listing() throws -> Set<String> {
        Set(try FileManager.default.contentsOfDirectory(atPath: dir.path))
    }

    // MARK: - convert and create

    func testConvertEverySubformat() throws {
        let src = try source()
        let types = ["monolithicSparse": "Monolithic sparse", "monolithicFlat": "Monolithic flat",
                     "twoGbMaxExtentSparse": "2GB extent sparse", "twoGbMaxExtentFlat": "2GB extent flat",
                     "streamOptimized": "Stream optimized"]
        for sub in Self.subformats {
            let before = try listing()
            let dst = path("c-\(sub).vmdk")
            let r = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", src, dst], in: dir)
            XCTAssertEqual(r.status, 0, "\(sub): \(r.stderr)")
            XCTAssertEqual(try listing().subtracting(before), Set(Self.files(sub, "c-\(sub)")), sub)
            try checkClean(dst, sub)
            try assertIdentical(src, dst, sub)
            let info = try vmdkinfo(dst, sub)
            XCTAssertTrue(info.contains("Disk type:\t\t\t\(types[sub]!)"), "\(sub): \(info)")
            XCTAssertTrue(info.contains("(\((2 << 30) + (3 << 20)) bytes)"), "\(sub): \(info)")
            if !sub.contains("Flat") {
                // Holes stay holes: far less than the guest size on disk.
                let used = Self.files(sub, "c-\(sub)").map { allocatedBytes(path($0)) }.reduce(0, +)
                XCTAssertLessThan(used, 32 << 20, sub)
            }
        }
        // The stream's header: version 3, compressed grains with markers, the directory where
        // the footer (the last sector but one) says, so a reader needs neither.
        let whole = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path("c-streamOptimized.vmdk"))))
        let h = Array(whole.prefix(80))
        let footer = Array(whole[whole.count - 1024 ..< whole.count - 512])
        XCTAssertEqual(Array(h[0 ..< 4]), Array("KDMV".utf8))
        XCTAssertEqual(h[4], 3, "version 3")
        XCTAssertEqual(Array(h[8 ..< 12]), [1, 0, 3, 0], "flags: newline detection, compressed grains, markers")
        XCTAssertEqual(Array(footer[0 ..< 4]), Array("KDMV".utf8))
        XCTAssertEqual(Array(h[56 ..< 64]), Array(footer[56 ..< 64]), "gdOffset as in the footer")
        XCTAssertNotEqual(Array(h[56 ..< 64]), [UInt8](repeating: 0xFF, count: 8), "gdOffset given, not at the end")
        XCTAssertEqual(h[77], 1, "deflate")
    }

    func testCreateEverySubformat() throws {
        for sub in Self.subformats {
            let before = try listing()
            let dst = path("n-\(sub).vmdk")
            let r = try Tools.ferry(["create", "-f", "vmdk", "-o", "subformat=\(sub),adapter_type=lsilogic,hwversion=10,toolsversion=777",
                                     dst, "\((2 << 30) + (1 << 20))"], in: dir)
            XCTAssertEqual(r.status, 0, "\(sub): \(r.stderr)")
            XCTAssertEqual(try listing().subtracting(before), Set(Self.files(sub, "n-\(sub)")), sub)
            try checkClean(dst, sub)
            let info = try Tools.run(try Tools.require("qemu-img"), ["info", "--output=json", dst], in: dir)
            XCTAssertTrue(info.stdout.contains("\"virtual-size\": \((2 << 30) + (1 << 20))"), "\(sub): \(info.stdout)")
            XCTAssertTrue(info.stdout.contains("\"create-type\": \"\(sub)\""), "\(sub): \(info.stdout)")
            _ = try vmdkinfo(dst, sub)
            // An empty image reads as zeros.
            let zero = try TestImage(name: "zero.raw", size: (2 << 30) + (1 << 20), writes: []).build(in: dir)
            try assertIdentical(zero, dst, sub)
            let text = String(decoding: try Data(contentsOf: URL(fileURLWithPath: dst)).prefix(64 << 10), as: UTF8.self)
            for line in ["ddb.adapterType = \"lsilogic\"", "ddb.virtualHWVersion = \"10\"", "ddb.toolsVersion = \"777\"",
                         "ddb.geometry.heads = \"255\"", "createType=\"\(sub)\"", "parentCID=ffffffff"] {
                XCTAssertTrue(text.contains(line), "\(sub): no \(line) in \(text)")
            }
        }
    }

    func testCompressionOnlyWithStreamOptimized() throws {
        let src = try TestImage(name: "s.raw", size: 4 << 20, writes: ["write -P 1 0 1M", "write -P 2 2M 64k"]).build(in: dir)
        let ok = try Tools.ferry(["convert", "-q", "-c", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, path("c.vmdk")], in: dir)
        XCTAssertEqual(ok.status, 0, ok.stderr)
        try checkClean(path("c.vmdk"), "-c stream")
        try assertIdentical(src, path("c.vmdk"), "-c stream")
        let bad = try Tools.ferry(["convert", "-c", "-f", "raw", "-O", "vmdk", src, path("x.vmdk")], in: dir)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("-c (compression) needs a target format that can compress"), bad.stderr)
        XCTAssertTrue(bad.stderr.contains("vmdk subformat=streamOptimized"), bad.stderr)
        XCTAssertFalse(fileExists(path("x.vmdk")))
    }

    /// Skips while Ferry cannot read VMDK (the reader is written on another branch).
    func skipWithoutReader(_ r: ProcessResult) throws {
        if r.stderr.contains("vmdk images cannot be read yet") { throw XCTSkip("Ferry cannot read vmdk images on this branch") }
    }

    /// Ferry reads back every subformat it writes; overlays over a Ferry-written base (`-B`,
    /// and `create -o backing_file`) read as they should and name the base's CID as parentCID.
    func testRoundTripAndOverlay() throws {
        let src = try TestImage(name: "r.raw", size: 6 << 20, writes: [
            "write -P 0x11 0 1M", "write -z 2M 256k", "write -P 0x22 3M 64k", "write -P 0x33 5M 512k",
        ]).build(in: dir)
        for sub in Self.subformats {
            let dst = path("r-\(sub).vmdk")
            let w = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", src, dst], in: dir)
            XCTAssertEqual(w.status, 0, "\(sub): \(w.stderr)")
            let back = path("r-\(sub).raw")
            let r = try Tools.ferry(["convert", "-q", "-O", "raw", dst, back], in: dir)
            try skipWithoutReader(r)
            XCTAssertEqual(r.status, 0, "\(sub): \(r.stderr)")
            let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", "raw", "-F", "raw", src, back], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(sub): \(cmp.stdout)")
        }
        // An overlay: the base plus one changed grain.
        let top = path("top.raw")
        try FileManager.default.copyItem(atPath: src, toPath: top)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x44 4M 64k", top], in: dir)
        for sub in ["monolithicSparse", "streamOptimized"] {
            let base = "r-\(sub).vmdk"
            let dst = path("o-\(sub).vmdk")
            let r = try Tools.ferry(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", "-B", base, "-F", "vmdk", top, dst], in: dir)
            try skipWithoutReader(r)
            XCTAssertEqual(r.status, 0, "\(sub): \(r.stderr)")
            try checkClean(dst, "overlay \(sub)")
            try assertIdentical(top, dst, "overlay \(sub)")
            func text(_ p: String) throws -> String { String(decoding: try Data(contentsOf: URL(fileURLWithPath: p)).prefix(16 << 10), as: UTF8.self) }
            let cid = try XCTUnwrap(try text(path(base)).split(separator: "\n").first { $0.hasPrefix("CID=") }).dropFirst(4)
            XCTAssertTrue(try text(dst).contains("parentCID=\(cid)\n"), sub)
            XCTAssertTrue(try text(dst).contains("parentFileNameHint=\"\(base)\"\n"), sub)
            // An empty overlay reads as its base.
            let empty = path("e-\(sub).vmdk")
            let c = try Tools.ferry(["create", "-f", "vmdk", "-o", "subformat=\(sub),backing_file=\(base)", empty], in: dir)
            XCTAssertEqual(c.status, 0, "\(sub): \(c.stderr)")
            try checkClean(empty, "empty overlay \(sub)")
            try assertIdentical(src, empty, "empty overlay \(sub)")
            XCTAssertTrue(try text(empty).contains("parentCID=\(cid)\n"), sub)
        }
    }

    // MARK: - bad input

    func testBadOptionsFailBeforeWriting() throws {
        let src = try TestImage(name: "s.raw", size: 1 << 20, writes: ["write -P 1 0 64k"]).build(in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", path("b.qcow2"), "1M"], in: dir)
        let cases: [([String], String)] = [
            (["create", "-f", "vmdk", "-o", "subformat=foo", "x.vmdk", "1M"], "subformat"),
            (["create", "-f", "vmdk", "-o", "adapter_type=scsi", "x.vmdk", "1M"], "adapter_type"),
            (["create", "-f", "vmdk", "-o", "compat6=on,hwversion=7", "x.vmdk", "1M"], "compat6 cannot be enabled with hwversion set"),
            (["create", "-f", "vmdk", "-o", "zeroed_grain=maybe", "x.vmdk", "1M"], "zeroed_grain"),
            (["create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat,zeroed_grain=on", "x.vmdk", "1M"], "zeroed_grain"),
            (["create", "-f", "vmdk", "-o", "subformat=monolithicFlat,backing_file=b.qcow2", "x.vmdk", "1M"], "backing file"),
            (["create", "-f", "vmdk", "-o", "backing_file=b.qcow2,backing_fmt=qcow2", "x.vmdk", "1M"], "vmdk"),
            (["create", "-f", "vmdk", "-o", "backing_file=b.qcow2", "x.vmdk", "1M"], "vmdk"),
            (["create", "-f", "vmdk", "-o", "bogus=1", "x.vmdk", "1M"], "bogus"),
            (["convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", "-B", "b.qcow2", src, "x.vmdk"], "backing file"),
            (["convert", "-O", "vmdk", "-o", "adapter_type=virtio", src, "x.vmdk"], "adapter_type"),
        ]
        for (args, mention) in cases {
            let before = try listing()
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("ferry: "), "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(mention), "\(args): should mention \(mention): \(r.stderr)")
            XCTAssertEqual(try listing(), before, "\(args): something was written")
        }
    }

    // MARK: - failure

    /// A copy that runs out of space midway removes the image and every extent file it made.
    func testFailedConvertLeavesNoFiles() throws {
        let mnt = path("tiny")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let m = try Tools.run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], in: dir)
        guard m.status == 0 else { throw XCTSkip("cannot mount a tmpfs here: \(m.stderr)") }
        mountPoint = mnt
        let src = try TestImage(name: "data.raw", size: 8 << 20, writes: []).build(in: dir)
        var noise = Data(count: 4 << 20)
        noise.withUnsafeMutableBytes { p in for k in 0 ..< p.count / 8 { p.storeBytes(of: UInt64.random(in: 0 ... .max), toByteOffset: k * 8, as: UInt64.self) } }
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: src))
        try h.seek(toOffset: 2 << 20)
        try h.write(contentsOf: noise)
        try h.close()
        for sub in Self.subformats {
            let r = try Tools.ferry(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", src, mnt + "/out.vmdk"], in: dir)
            XCTAssertEqual(r.status, 1, sub)
            XCTAssertTrue(r.stderr.contains("No space left on device"), "\(sub): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("removed"), "\(sub): \(r.stderr)")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: mnt), [], "\(sub): files left behind")
        }
    }

    /// An extent file that cannot be made (its name is taken by a folder) fails the create
    /// and leaves nothing behind: not the descriptor file made before it either.
    func testExtentThatCannotBeMadeLeavesNoFiles() throws {
        try FileManager.default.createDirectory(atPath: path("x-flat.vmdk"), withIntermediateDirectories: true)
        let before = try listing()
        let r = try Tools.ferry(["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", "x.vmdk", "1M"], in: dir)
        XCTAssertEqual(r.status, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("x-flat.vmdk"), r.stderr)
        XCTAssertEqual(try listing(), before, "files left behind")
    }

    /// A conversion killed midway leaves a file that is no VMDK image (its header is written
    /// last), so nothing takes it for a finished one.
    func testKilledConversionIsNoImage() throws {
        let src = try TestImage(name: "big.raw", size: 256 << 20, writes: ["write -P 0x5a 0 200M"]).build(in: dir)
        for sub in ["monolithicSparse", "streamOptimized"] {
            let dst = path("killed-\(sub).vmdk")
            let p = try Tools.start(try Tools.require("ferry"),
                                    ["convert", "--progress=json", "-f", "raw", "-O", "vmdk", "-o", "subformat=\(sub)", "-m", "1",
                                     "--buffer-size", "64k", "-t", "writethrough", src, dst], in: dir)
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline && p.process.isRunning && !p.stdoutSoFar.contains("\"final\":false") { usleep(20_000) }
            guard p.process.isRunning else { throw XCTSkip("the copy finished too fast to interrupt") }
            usleep(200_000)
            p.signal(SIGKILL)
            let r = try p.wait(timeout: 10)
            XCTAssertTrue(r.signalled)
            XCTAssertFalse(fileExists(dst), "the image gets its name only when it is complete")
            let partial = dst + ".ferry-partial"
            XCTAssertTrue(fileExists(partial), "a killed ferry cannot remove its partial file")
            let head = [UInt8](try Data(contentsOf: URL(fileURLWithPath: partial)).prefix(4))
            XCTAssertNotEqual(head, Array("KDMV".utf8), sub)
            let info = try Tools.run(try Tools.require("qemu-img"), ["info", "--output=json", partial], in: dir)
            XCTAssertFalse(info.stdout.contains("\"format\": \"vmdk\""), "\(sub): \(info.stdout)")
        }
    }
}
