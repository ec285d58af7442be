import Foundation
import XCTest

/// `ferry` on formats it reads but does not write (Parallels, cloop, Bochs, dmg), and on
/// formats it only names (qcow version 1, LUKS): `info` and `map` print what qemu-img 7.2 prints, `convert`
/// copies what qemu-img copies, `-O` with them is refused, and broken images give one line.
final class ReadOnlyFormatsCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("roformats") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func parallels(_ name: String, clusterSize: String = "", size: String = "64M") throws -> String {
        var args = ["create", "-q", "-f", "parallels"]
        if !clusterSize.isEmpty { args += ["-o", "cluster_size=\(clusterSize)"] }
        try Tools.must("qemu-img", args + [name, size], in: dir)
        try Tools.must("qemu-io", ["-f", "parallels", "-c", "write -P 0xab 0 4k", "-c", "write -P 0x11 3M 5M",
                                   "-c", "write -P 0 20M 1M", "-c", "write -P 0x22 40M 512"] + [name], in: dir)
        return name
    }

    func testInfoAndMapMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        let images = [try parallels("default.img"), try parallels("c64k.img", clusterSize: "64k"),
                      try parallels("odd.img", size: "45000192"), dir.appendingPathComponent("default.img").path]
        for image in images {
            for c in [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]] {
                let theirs = try Tools.run(qemu, c + [image], in: dir)
                let ours = try Tools.ferry(c + [image], in: dir)
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \(c.joined(separator: " ")) \(image) differs from qemu-img")
                XCTAssertEqual(ours.status, 0, "ferry \(c.joined(separator: " ")) \(image): \(ours.stderr)")
                XCTAssertEqual(ours.stderr, "", "ferry \(c.joined(separator: " ")) \(image)")
            }
        }
    }

    func testConvertMatchesQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        for image in [try parallels("default.img"), try parallels("c4k.img", clusterSize: "4k")] {
            for target in ["raw", "qcow2"] {
                let out = "\(image).\(target)"
                let r = try Tools.ferry(["convert", "-O", target, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -> \(target): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-f", "parallels", "-F", target, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(target): \(cmp.stdout) \(cmp.stderr)")
            }
            // Holes stay holes.
            XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent("\(image).raw").path), 16 << 20, image)
        }
    }

    func testWritingReadOnlyFormatsIsRefused() throws {
        let src = dir.appendingPathComponent("src.raw").path
        XCTAssertTrue(FileManager.default.createFile(atPath: src, contents: Data(repeating: 1, count: 1 << 20)))
        for (format, text) in [("parallels", "format 'parallels' can be read but cannot be written (writable formats: raw, qcow2"),
                               ("dmg", "format 'dmg' can be read but cannot be written (writable formats: raw, qcow2"),
                               ("luks", "format 'luks' cannot be written (writable formats: raw, qcow2")] {
            let out = dir.appendingPathComponent("out.\(format)").path
            let r = try Tools.ferry(["convert", "-O", format, src, out], in: dir)
            XCTAssertNotEqual(r.status, 0, format)
            XCTAssertTrue(r.stderr.contains(text), r.stderr)
            XCTAssertEqual(r.stderr.filter { $0 == "\n" }.count, 1, r.stderr)
            XCTAssertFalse(fileExists(out), "\(format): nothing is created")
        }
        // `-o help` lists creation options: none to list for a format that is not written.
        for args in [["convert", "-O", "parallels", "-o", "help"], ["create", "-f", "dmg", "-o", "help"]] {
            let h = try Tools.ferry(args, in: dir)
            XCTAssertEqual(h.status, 1, args.joined(separator: " "))
            XCTAssertEqual(h.stdout, "")
            XCTAssertTrue(h.stderr.contains("can be read but cannot be written"), h.stderr)
        }
        // Reading a format Ferry only names, by name.
        let r = try Tools.ferry(["info", "-f", "qcow", src], in: dir)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("Ferry does not read format 'qcow' (readable formats: raw, qcow2"), r.stderr)
        XCTAssertFalse(r.stderr.contains("not supported yet"), r.stderr)
    }

    /// Files of formats Ferry does not read are named, never read as raw.
    func testProbingNamesFormatsFerryDoesNotRead() throws {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow", "old.qcow", "1M"], in: dir)
        // A LUKS header's start (qemu-img's own create benchmarks the key derivation, which
        // fails on a busy machine): the magic and version 1.
        let luks = Data("LUKS".utf8) + Data([0xBA, 0xBE, 0, 1]) + Data("aes".utf8) + Data(repeating: 0, count: 8192)
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("disk.luks").path, contents: luks))
        for (file, name) in [("old.qcow", "qcow"), ("disk.luks", "luks")] {
            for c in [["info"], ["map"], ["convert", "-O", "raw"]] {
                var args = c + [file]
                if c[0] == "convert" { args.append("\(file).raw") }
                let r = try Tools.ferry(args, in: dir)
                XCTAssertNotEqual(r.status, 0, "ferry \(args.joined(separator: " "))")
                XCTAssertEqual(r.stderr, "ferry: \(file): image is in \(name) format, which Ferry does not read\n",
                               "ferry \(args.joined(separator: " "))")
            }
            // qemu-img agrees on the name.
            let q = try Tools.run(try Tools.require("qemu-img"), ["info", "--output=json", file], in: dir)
            if q.status == 0 { XCTAssertTrue(q.stdout.contains("\"format\": \"\(name)\""), "\(file): \(q.stdout)") }
        }
        // A file ending in a "koly" trailer is a dmg (here a broken one), never raw.
        var koly = Data(repeating: 0x41, count: 8192) + Data("koly".utf8)
        koly += Data(repeating: 0, count: 508)
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("broken.dmg").path, contents: koly))
        let k = try Tools.ferry(["info", "broken.dmg"], in: dir)
        XCTAssertEqual(k.status, 1)
        XCTAssertEqual(k.stderr, "ferry: broken.dmg: dmg image keeps its block tables only in a resource fork (no XML property list), which Ferry does not read at offset 8416\n")
        // "koly" anywhere else, or a file too short for the trailer, is still raw.
        var notDmg = Data(repeating: 0, count: 4096)
        notDmg.replaceSubrange(1000 ..< 1004, with: Data("koly".utf8))
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("plain.raw").path, contents: notDmg))
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("tiny.raw").path, contents: Data("koly".utf8)))
        for file in ["plain.raw", "tiny.raw"] {
            let r = try Tools.ferry(["info", "--output=json", file], in: dir)
            XCTAssertEqual(r.status, 0, "\(file): \(r.stderr)")
            XCTAssertTrue(r.stdout.contains("\"format\": \"raw\""), r.stdout)
        }
    }

    func testBrokenParallelsImagesGiveOneLine() throws {
        func patched(_ name: String, _ offset: UInt64, _ bytes: [UInt8]) throws -> String {
            let file = try parallels(name, clusterSize: "64k")
            let h = try FileHandle(forUpdating: dir.appendingPathComponent(file))
            defer { try? h.close() }
            try h.seek(toOffset: offset)
            try h.write(contentsOf: Data(bytes))
            return file
        }
        let cases: [(String, String)] = [
            (try patched("cluster0.img", 28, [0, 0, 0, 0]), "parallels cluster size of 0 sectors is out of range"),
            (try patched("bat.img", 64, [0xFF, 0xFF, 0xFF, 0]), "parallels BAT entry 0 points to file offset"),
            (try patched("sectors.img", 36, [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]), "parallels disk size of 4294967295 sectors needs"),
        ]
        for (file, text) in cases {
            for c in [["info"], ["map"], ["convert", "-O", "raw"]] {
                var args = c + [file]
                if c[0] == "convert" { args.append("\(file).raw") }
                let r = try Tools.ferry(args, in: dir)
                XCTAssertEqual(r.status, 1, "ferry \(args.joined(separator: " ")): \(r.stderr)")
                XCTAssertTrue(r.stderr.hasPrefix("ferry: \(file): \(text)"), r.stderr)
                XCTAssertEqual(r.stderr.filter { $0 == "\n" }.count, 1, r.stderr)
            }
        }
        // A file that ends inside the header.
        let cut = dir.appendingPathComponent("cut.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: cut.path, contents: Data("WithoutFreeSpace".utf8) + Data([2, 0, 0, 0, 1])))
        let r = try Tools.ferry(["info", "cut.img"], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "ferry: cut.img: parallels header is truncated: the file has 21 of its 64 bytes at offset 0\n")
    }

    // MARK: - cloop and bochs, built byte by byte

    static func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0 ..< n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64(n - 1 - $0))) } }
    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0 ..< n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    /// A zlib stream (RFC 1950) of one stored deflate block (RFC 1951), for up to 65535 bytes.
    static func storedZlib(_ data: [UInt8]) -> [UInt8] {
        var a: UInt32 = 1, b: UInt32 = 0
        for byte in data { a = (a + UInt32(byte)) % 65521; b = (b + a) % 65521 }
        let n = UInt16(data.count)
        return [0x78, 0x01, 0x01] + le(UInt64(n), 2) + le(UInt64(~n), 2) + data + be(UInt64(b << 16 | a), 4)
    }

    /// A cloop v2.0 image of 32 KiB blocks, each stored (not compressed) in its zlib stream.
    static func cloop(_ blocks: [[UInt8]]) -> [UInt8] {
        var out = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)
        out += [UInt8](repeating: 0, count: 128 - out.count) + be(32768, 4) + be(UInt64(blocks.count), 4)
        let streams = blocks.map(storedZlib)
        var at = UInt64(out.count + (blocks.count + 1) * 8)
        for s in streams { out += be(at, 8); at += UInt64(s.count) }
        return out + be(at, 8) + streams.flatMap { $0 }
    }

    /// A bochs growing image of 4 extents of 4 KiB: extent 2 holds sectors 0 and 5.
    static func bochs() -> [UInt8] {
        func padded(_ s: String, _ n: Int) -> [UInt8] { Array(s.utf8) + [UInt8](repeating: 0, count: n - s.utf8.count) }
        var h = padded("Bochs Virtual HD Image", 32) + padded("Redolog", 16) + padded("Growing", 16)
        h += le(0x20000, 4) + le(512, 4) + le(4, 4) + le(512, 4) + le(4096, 4) + le(0, 4) + le(16384, 8)
        h += [UInt8](repeating: 0, count: 512 - h.count)
        h += le(0xFFFF_FFFF, 4) + le(0xFFFF_FFFF, 4) + le(0, 4) + le(0xFFFF_FFFF, 4)
        var bitmap = [UInt8](repeating: 0, count: 512)
        bitmap[0] = 0b0010_0001
        return h + bitmap + (0 ..< 4096).map { UInt8(truncatingIfNeeded: $0 / 512 + 1) }
    }

    func testCloopAndBochsMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        let blocks = (0 ..< 6).map { i in (0 ..< 32768).map { UInt8(truncatingIfNeeded: i == 3 ? 0 : $0 * (i + 1)) } }
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("disk.cloop").path, contents: Data(Self.cloop(blocks))))
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("disk.bochs").path, contents: Data(Self.bochs())))
        for (image, format) in [("disk.cloop", "cloop"), ("disk.bochs", "bochs")] {
            for c in [["info"], ["info", "--output=json"], ["map", "--output=json"]] {
                let theirs = try Tools.run(qemu, c + [image], in: dir)
                let ours = try Tools.ferry(c + [image], in: dir)
                XCTAssertEqual(theirs.status, 0, theirs.stderr)
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \(c.joined(separator: " ")) \(image) differs from qemu-img")
                XCTAssertEqual(ours.status, 0, "ferry \(c.joined(separator: " ")) \(image): \(ours.stderr)")
            }
            // Human map: no place in the file to show, as qemu-img says too.
            let m = try Tools.ferry(["map", image], in: dir)
            XCTAssertNotEqual(m.status, 0)
            XCTAssertEqual(m.stdout, try Tools.run(qemu, ["map", image], in: dir).stdout)
            for target in ["raw", "qcow2"] {
                let out = "\(image).\(target)"
                let r = try Tools.ferry(["convert", "-O", target, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -> \(target): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-f", format, "-F", target, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(target): \(cmp.stdout) \(cmp.stderr)")
            }
            let w = try Tools.ferry(["convert", "-O", format, "disk.cloop", "out.\(format)"], in: dir)
            XCTAssertNotEqual(w.status, 0)
            XCTAssertTrue(w.stderr.contains("format '\(format)' can be read but cannot be written (writable formats: raw, qcow2"), w.stderr)
        }
        // The bochs image's holes stay holes: only the two written sectors are data.
        let raw = try Data(contentsOf: dir.appendingPathComponent("disk.bochs.raw"))
        XCTAssertEqual(raw.count, 16384)
        XCTAssertEqual(raw[8192], 1)
        XCTAssertEqual(raw[8192 + 5 * 512], 6)
        XCTAssertEqual(raw.filter { $0 != 0 }.count, 1024)
    }

    func testBrokenCloopAndBochsGiveOneLine() throws {
        var cloop = Self.cloop([[UInt8](repeating: 7, count: 32768)])
        cloop.replaceSubrange(128 ..< 132, with: Self.be(1000, 4))
        var bochs = Self.bochs()
        bochs.replaceSubrange(512 + 8 ..< 512 + 12, with: Self.le(9, 4))
        var stream = Self.cloop([[UInt8](repeating: 7, count: 32768)])
        stream[154] ^= 0xFF   // the deflate block header: not final, of the reserved type 3
        for (file, bytes, text) in [("bs.cloop", cloop, "cloop block size 1000 is not a multiple of 512"),
                                    ("entry.bochs", bochs, "bochs catalog entry 2 puts its extent at file offset"),
                                    ("stream.cloop", stream, "cloop block 0 at file offset 152 is not a valid zlib stream")] {
            XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent(file).path, contents: Data(bytes)))
            let r = try Tools.ferry(["convert", "-O", "raw", file, "\(file).raw"], in: dir)
            XCTAssertEqual(r.status, 1, r.stderr)
            XCTAssertTrue(r.stderr.hasPrefix("ferry: \(file): \(text)"), r.stderr)
            XCTAssertEqual(r.stderr.filter { $0 == "\n" }.count, 1, r.stderr)
        }
    }

    /// A dmg of 40 sectors: 8 stored plainly, 16 of zero fill, 16 in a zlib stream (one stored
    /// deflate block), one table, then the property list and the koly trailer.
    static func dmg() -> [UInt8] {
        let raw = (0 ..< 4096).map { UInt8(truncatingIfNeeded: $0 / 3) }
        let z = storedZlib([UInt8](repeating: 0x42, count: 8192))
        var m = Array("mish".utf8) + be(1, 4) + be(0, 8) + be(40, 8) + be(0, 8)
        m += [UInt8](repeating: 0, count: 200 - m.count) + be(4, 4)
        for (type, s, c, off, len) in [(UInt64(1), UInt64(0), UInt64(8), UInt64(0), UInt64(4096)), (0, 8, 16, 0, 0),
                                       (0x8000_0005, 24, 16, 4096, UInt64(z.count)), (0xFFFF_FFFF, 40, 0, 0, 0)] {
            m += be(type, 4) + be(0, 4) + be(s, 8) + be(c, 8) + be(off, 8) + be(len, 8)
        }
        let plist = Array("<plist version=\"1.0\"><dict><key>resource-fork</key><dict><key>blkx</key><array><dict><key>Data</key><data>\n\(Data(m).base64EncodedString(options: .lineLength64Characters))\n</data></dict></array></dict></dict></plist>\n".utf8)
        let xmlAt = UInt64(raw.count + z.count)
        var koly = Array("koly".utf8) + be(4, 4) + be(512, 4)
        koly += [UInt8](repeating: 0, count: 216 - koly.count) + be(xmlAt, 8) + be(UInt64(plist.count), 8)
        koly += [UInt8](repeating: 0, count: 492 - koly.count) + be(40, 8)
        return raw + z + plist + koly + [UInt8](repeating: 0, count: 512 - koly.count)
    }

    func testDMGMatchesQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        XCTAssertTrue(FileManager.default.createFile(atPath: dir.appendingPathComponent("disk.img").path, contents: Data(Self.dmg())))
        // Probed by the trailer whatever the file is called.
        for c in [["info"], ["info", "--output=json"], ["map", "--output=json"]] {
            let theirs = try Tools.run(qemu, c + ["-f", "dmg", "disk.img"], in: dir)
            let ours = try Tools.ferry(c + ["disk.img"], in: dir)
            XCTAssertEqual(theirs.status, 0, theirs.stderr)
            XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \(c.joined(separator: " ")) differs from qemu-img")
            XCTAssertEqual(ours.stderr, "")
        }
        for target in ["raw", "qcow2"] {
            let r = try Tools.ferry(["convert", "-O", target, "disk.img", "out.\(target)"], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let cmp = try Tools.run(qemu, ["compare", "-f", "dmg", "-F", target, "disk.img", "out.\(target)"], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(cmp.stdout) \(cmp.stderr)")
        }
        let raw = try Data(contentsOf: dir.appendingPathComponent("out.raw"))
        XCTAssertEqual(raw.count, 40 * 512)
        XCTAssertEqual(raw[4095], UInt8(truncatingIfNeeded: 4095 / 3))
        XCTAssertEqual(raw[24 * 512], 0x42)
        XCTAssertEqual(raw[4096 ..< 24 * 512].filter { $0 != 0 }.count, 0)
    }
}
