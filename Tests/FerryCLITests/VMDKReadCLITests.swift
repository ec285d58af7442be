import Foundation
import XCTest

/// `ferry` against `qemu-img` (and libvmdk's `vmdkinfo`) on VMDK images qemu-img made:
/// `convert` copies what qemu-img copies, `info` and `map` print the same bytes.
final class VMDKReadCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("vmdk-read") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    static let subformats = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]

    /// One image of each subformat (5 GiB, so the twoGb ones have three extents), the same
    /// data in each; a parent chain; a zeroed-grain image. Names relative to `dir`.
    func buildImages() throws -> [String] {
        let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 8M 1M", "write -P 0x22 2047M 2M", "write -P 0x33 4095M 1M"]
        var names: [String] = []
        for sub in Self.subformats where sub != "streamOptimized" {
            let name = "\(sub).vmdk"
            try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "-o", "subformat=\(sub)", name, "5G"], in: dir)
            try Tools.must("qemu-io", ["-f", "vmdk"] + writes.flatMap { ["-c", $0] } + [name], in: dir)
            names.append(name)
        }
        try Tools.must("qemu-img", ["convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "monolithicSparse.vmdk", "streamOptimized.vmdk"], in: dir)
        names.append("streamOptimized.vmdk")
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "zg.vmdk", "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "vmdk", "-c", "write -P 1 0 1M", "-c", "write -z 4M 2M", "zg.vmdk"], in: dir)
        names.append("zg.vmdk")
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("sub"), withIntermediateDirectories: true)
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "sub/base.vmdk", "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "vmdk", "-c", "write -P 7 0 8M", "sub/base.vmdk"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "-b", "sub/base.vmdk", "-F", "vmdk", "top.vmdk"], in: dir)
        try Tools.must("qemu-io", ["-f", "vmdk", "-c", "write -P 9 1M 1M", "-c", "write -P 10 60M 64k", "top.vmdk"], in: dir)
        names.append("top.vmdk")
        // ESX-style descriptors written by hand: a VMFS extent, and extents of two kinds
        // (qemu-img then shows neither a cluster size nor a dirty flag).
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "esx-flat.vmdk", "2M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 512k 64k", "esx-flat.vmdk"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "part-s.vmdk", "1M"], in: dir)
        try Tools.must("qemu-io", ["-f", "vmdk", "-c", "write -P 0x5b 64k 64k", "part-s.vmdk"], in: dir)
        for (name, type, extents) in [("esx.vmdk", "vmfs", "RW 4096 VMFS \"esx-flat.vmdk\""),
                                      ("mixed.vmdk", "monolithicFlat", "RW 2048 FLAT \"esx-flat.vmdk\" 2048\nRW 2048 SPARSE \"part-s.vmdk\"")] {
            let text = "# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\ncreateType=\"\(type)\"\n\n# Extent description\n\(extents)\n\n# The Disk Data Base\n#DDB\n"
            try text.write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
            names.append(name)
        }
        return names
    }

    func testInfoAndMapMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        var images = try buildImages()
        images.append(dir.appendingPathComponent("twoGbMaxExtentSparse.vmdk").path)   // absolute names too
        for image in images {
            var commands: [[String]] = [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]]
            if image == "top.vmdk" { commands += [["info", "--backing-chain"], ["info", "--backing-chain", "--output=json"]] }
            for c in commands {
                let theirs = try Tools.run(qemu, c + [image], in: dir)
                let ours = try Tools.ferry(c + [image], in: dir)
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \(c.joined(separator: " ")) \(image) differs from qemu-img")
                XCTAssertEqual(ours.status == 0, theirs.status == 0, "ferry \(c.joined(separator: " ")) \(image): \(ours.stderr)")
                if theirs.status == 0 { XCTAssertEqual(ours.stderr, "", "ferry \(c.joined(separator: " ")) \(image)") }
            }
        }
    }

    func testConvertEverySubformat() throws {
        let qemu = try Tools.require("qemu-img")
        for image in try buildImages() {
            for (format, out) in [("raw", "\(image).raw"), ("qcow2", "\(image).qcow2")] {
                let r = try Tools.ferry(["convert", "-O", format, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -O \(format): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-f", "vmdk", "-F", format, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(format): \(cmp.stdout)\(cmp.stderr)")
                try? FileManager.default.removeItem(at: dir.appendingPathComponent(out))
            }
        }
    }

    /// libvmdk reads the same images and agrees on their size and their bytes.
    func testVmdkinfoAgrees() throws {
        let vmdkinfo = try Tools.require("vmdkinfo")
        for image in try buildImages() where !["top.vmdk", "esx.vmdk", "mixed.vmdk"].contains(image) {
            let r = try Tools.run(vmdkinfo, [image], in: dir)
            XCTAssertEqual(r.status, 0, "vmdkinfo \(image): \(r.stderr)")
            guard let line = r.stdout.split(separator: "\n").first(where: { $0.contains("Media size:") }),
                  let open = line.lastIndex(of: "("), let bytes = Int64(line[line.index(after: open)...].split(separator: " ")[0]) else {
                XCTFail("vmdkinfo \(image) shows no media size: \(r.stdout)")
                continue
            }
            let ours = try Tools.ferry(["info", "--output=json", image], in: dir)
            XCTAssertTrue(ours.stdout.contains("\"virtual-size\": \(bytes),"), "ferry and vmdkinfo disagree on \(image): \(bytes)\n\(ours.stdout)")
        }
    }

    func testParentChainConverts() throws {
        _ = try buildImages()
        let r = try Tools.ferry(["convert", "-O", "raw", "top.vmdk", "top.raw"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-F", "raw", "top.vmdk", "top.raw"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
        // -B keeps the parent: only the overlay's own grains are copied.
        let b = try Tools.ferry(["convert", "-O", "qcow2", "-B", "sub/base.vmdk", "-F", "vmdk", "top.vmdk", "top.qcow2"], in: dir)
        XCTAssertEqual(b.status, 0, b.stderr)
        if b.status == 0 {
            let cmp2 = try Tools.run(try Tools.require("qemu-img"), ["compare", "top.vmdk", "top.qcow2"], in: dir)
            XCTAssertEqual(cmp2.status, 0, cmp2.stdout + cmp2.stderr)
        }
    }

    /// 1 TiB monolithicSparse with a few MiB written: converted in seconds, only the data read.
    func testTerabyteSparseImage() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "tera.vmdk", "1T"], in: dir)
        try Tools.must("qemu-io", ["-f", "vmdk", "-c", "write -P 7 100G 1M", "-c", "write -P 8 900G 2M", "tera.vmdk"], in: dir)
        let r = try Tools.ferry(["convert", "-O", "raw", "tera.vmdk", "tera.raw"], in: dir, timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("read 3 MiB, wrote 3 MiB"), r.stderr)
        // qemu-img takes half a minute to compare a 1 TiB VMDK: the same writes to a raw
        // file are the reference instead (raw against raw is compared from the holes).
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "expected.raw", "1T"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 7 100G 1M", "-c", "write -P 8 900G 2M", "expected.raw"], in: dir)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-q", "-f", "raw", "-F", "raw", "expected.raw", "tera.raw"], in: dir, timeout: 120)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
        XCTAssertLessThanOrEqual(allocatedBytes(dir.appendingPathComponent("tera.raw").path), 4 << 20)
    }

    func testBrokenImageIsOneLine() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", "flat.vmdk", "3G"], in: dir)
        try FileManager.default.removeItem(at: dir.appendingPathComponent("flat-f002.vmdk"))
        let r = try Tools.ferry(["convert", "-O", "raw", "flat.vmdk", "out.raw"], in: dir)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("flat.vmdk") && r.stderr.contains("flat-f002.vmdk"), r.stderr)
        XCTAssertFalse(fileExists(dir.appendingPathComponent("out.raw").path))
    }
}
