import XCTest
import FerryCore
@testable import FerryConvert

/// The tar reader under OVA support: well-formed archives (ustar, GNU, PAX) read right, and
/// every kind of broken header gives one error naming the structure and the offset.
final class OVATarArchiveTests: XCTestCase {
    // MARK: - A small ustar writer, so that headers can be broken on purpose

    static func octal(_ v: Int64, _ width: Int) -> [UInt8] {
        var digits = Array(String(v, radix: 8).utf8)
        while digits.count < width - 1 { digits.insert(UInt8(ascii: "0"), at: 0) }
        return digits + [0]
    }

    static func header(_ name: String, size: Int64, type: UInt8 = UInt8(ascii: "0"), sizeField: [UInt8]? = nil,
                       prefix: String = "", gnu: Bool = false) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: 512)
        func put(_ bytes: [UInt8], _ at: Int) { for (i, b) in bytes.enumerated() { h[at + i] = b } }
        put(Array(name.utf8.prefix(100)), 0)
        put(octal(0o644, 8), 100)
        put(octal(0, 8), 108)
        put(octal(0, 8), 116)
        put(sizeField ?? octal(size, 12), 124)
        put(octal(0, 12), 136)
        h[156] = type
        if gnu {
            put(Array("ustar  \0".utf8), 257)
        } else {
            put(Array("ustar\0".utf8), 257)
            put(Array("00".utf8), 263)
            put(Array(prefix.utf8), 345)
        }
        put(Array(repeating: UInt8(ascii: " "), count: 8), 148)
        let sum = h.reduce(0) { $0 + Int64($1) }
        put(octal(sum, 7) + [UInt8(ascii: " ")], 148)
        return h
    }

    static func padded(_ data: [UInt8]) -> [UInt8] {
        data + [UInt8](repeating: 0, count: (512 - data.count % 512) % 512)
    }

    static func member(_ name: String, _ data: [UInt8], type: UInt8 = UInt8(ascii: "0")) -> [UInt8] {
        header(name, size: Int64(data.count), type: type) + padded(data)
    }

    static let end = [UInt8](repeating: 0, count: 1024)

    /// One PAX record, `LENGTH KEY=VALUE\n`, LENGTH counting its own digits.
    static func pax(_ key: String, _ value: String) -> [UInt8] {
        let body = " \(key)=\(value)\n"
        var n = body.utf8.count + 1
        while body.utf8.count + String(n).count != n { n = body.utf8.count + String(n).count }
        return Array((String(n) + body).utf8)
    }

    func device(_ bytes: [UInt8], name: String = "test.ova") async throws -> MemoryDevice {
        let d = MemoryDevice(name: name, size: Int64(bytes.count))
        try await d.write(at: 0, bytes: bytes)
        return d
    }

    func read(_ bytes: [UInt8]) async throws -> TarArchive {
        try await TarArchive.read(try await device(bytes))
    }

    /// The archive must be refused with a `.corrupt` error whose text holds `words` and
    /// whose offset is `offset`.
    func assertRefused(_ bytes: [UInt8], offset: Int64, _ words: String..., file: StaticString = #filePath, line: UInt = #line) async {
        do {
            let a = try await read(bytes)
            XCTFail("accepted: \(a.members.map(\.name))", file: file, line: line)
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .corrupt, "\(e)", file: file, line: line)
            XCTAssertEqual(e.offset, offset, "\(e)", file: file, line: line)
            XCTAssertEqual(e.path, "test.ova", file: file, line: line)
            for w in words { XCTAssertTrue(e.description.contains(w), "'\(w)' not in: \(e)", file: file, line: line) }
            XCTAssertFalse(e.description.contains("\n"), file: file, line: line)
        } catch {
            XCTFail("unexpected \(error)", file: file, line: line)
        }
    }

    // MARK: - Well-formed archives

    func testReadsMembersAndTheirBytesInPlace() async throws {
        let a = Array("hello ovf".utf8)
        let b = (0 ..< 1500).map { UInt8($0 % 251) }
        let bytes = Self.member("./app.ovf", a) + Self.header("dir/", size: 0, type: UInt8(ascii: "5"))
            + Self.member("dir/disk1.vmdk", b) + Self.end
        let dev = try await device(bytes)
        let archive = try await TarArchive.read(dev)
        XCTAssertEqual(archive.members.map(\.name), ["app.ovf", "dir", "dir/disk1.vmdk"])
        XCTAssertEqual(archive.members.map(\.kind), [.file, .directory, .file])
        let disk = try XCTUnwrap(archive.member(named: "dir/disk1.vmdk"))
        XCTAssertEqual(disk.dataOffset, 512 + 512 + 512 + 512)
        XCTAssertEqual(disk.size, 1500)
        let slice = try SliceDevice(dev, start: disk.dataOffset, size: disk.size, name: "test.ova/dir/disk1.vmdk", ownsBase: false)
        let got = try await slice.read(at: 0, count: 1500)
        XCTAssertEqual(got, b)
        let extents = try await slice.extents(in: 100 ..< 1500)
        XCTAssertEqual(extents.first?.offset, 100)
        XCTAssertLessThanOrEqual(extents.last!.end, 1500)
        XCTAssertThrowsError(try SliceDevice(dev, start: disk.dataOffset, size: dev.size, name: "x", ownsBase: false))
    }

    func testUstarPrefixGNULongNamesBase256SizesAndPAXRecords() async throws {
        let long = String(repeating: "d", count: 150) + "/disk.vmdk"
        var bytes = Self.header("disk.vmdk", size: 3, prefix: "some/dir") + Self.padded([1, 2, 3])
        // GNU: an `L` member carrying the next member's name, then that member.
        bytes += Self.header("././@LongLink", size: Int64(long.utf8.count + 1), type: UInt8(ascii: "L"), gnu: true)
            + Self.padded(Array(long.utf8) + [0])
        // ...whose size is in base-256.
        var big = [UInt8](repeating: 0, count: 12)
        big[0] = 0x80
        big[11] = 5
        bytes += Self.header("short", size: 0, sizeField: big, gnu: true) + Self.padded([9, 9, 9, 9, 9])
        // PAX: `path` and `size` override the ustar header that follows.
        let records = Self.pax("path", "pax/named/disk.raw") + Self.pax("size", "700") + Self.pax("mtime", "1700000000")
        bytes += Self.header("PaxHeaders/x", size: Int64(records.count), type: UInt8(ascii: "x")) + Self.padded(records)
        bytes += Self.header("truncated-name", size: 0) + Self.padded([UInt8](repeating: 7, count: 700))
        bytes += Self.end
        let archive = try await read(bytes)
        XCTAssertEqual(archive.members.map(\.name), ["some/dir/disk.vmdk", long, "pax/named/disk.raw"])
        XCTAssertEqual(archive.members.map(\.size), [3, 5, 700])
        XCTAssertEqual(archive.members[1].headerOffset, 1024)
    }

    func testArchivesMadeByPythonTarfileInAllThreeFormats() async throws {
        let dir = NSTemporaryDirectory() + "ferry-tar-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let script = """
        import tarfile, io, sys
        for fmt, name in ((tarfile.USTAR_FORMAT, 'u.tar'), (tarfile.GNU_FORMAT, 'g.tar'), (tarfile.PAX_FORMAT, 'p.tar')):
            with tarfile.open(sys.argv[1] + '/' + name, 'w', format=fmt) as t:
                for n, data in (('a.ovf', b'x' * 10), ('sub/' + 'n' * 90 + '/disk1.vmdk', bytes(range(256)) * 9)):
                    info = tarfile.TarInfo(n)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = ["-c", script, dir]
        try p.run()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        for name in ["u.tar", "g.tar", "p.tar"] {
            let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: dir + "/" + name)))
            let dev = try await device(bytes, name: name)
            let archive = try await TarArchive.read(dev)
            XCTAssertEqual(archive.members.map(\.name), ["a.ovf", "sub/" + String(repeating: "n", count: 90) + "/disk1.vmdk"], name)
            let m = archive.members[1]
            let data = try await dev.read(at: m.dataOffset, count: Int(m.size))
            XCTAssertEqual(data, Array((0 ..< 9).flatMap { _ in (0 ..< 256).map { UInt8($0) } }), name)
        }
    }

    /// GNU tar's own sparse members (`-S`): with 30 data runs the sparse map needs extension
    /// blocks after the header, which must be skipped to find the next member.
    func testGNUSparseMembersAreListedAndSkipped() async throws {
        let dir = NSTemporaryDirectory() + "ferry-tar-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let script = """
        import os, sys
        d = sys.argv[1]
        with open(d + '/sparse.raw', 'wb') as f:
            for i in range(30):
                f.seek(i * 65536)
                f.write(b'x' * 512)
            f.truncate(30 * 65536)
        with open(d + '/after.ovf', 'wb') as f:
            f.write(b'after')
        """
        for (exe, args) in [("/usr/bin/python3", ["-c", script, dir]),
                            ("/bin/tar", ["--format=gnu", "-S", "-C", dir, "-cf", dir + "/s.tar", "sparse.raw", "after.ovf"])] {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: exe)
            p.arguments = args
            try p.run()
            p.waitUntilExit()
            XCTAssertEqual(p.terminationStatus, 0, exe)
        }
        let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: dir + "/s.tar")))
        let dev = try await device(bytes)
        let archive = try await TarArchive.read(dev)
        XCTAssertEqual(archive.members.map(\.name), ["sparse.raw", "after.ovf"])
        XCTAssertEqual(archive.members.first?.kind, .other(type: UInt8(ascii: "S")))
        let m = try XCTUnwrap(archive.members.dropFirst().first)
        let data = try await dev.read(at: m.dataOffset, count: Int(m.size))
        XCTAssertEqual(data, Array("after".utf8))
    }

    // MARK: - Broken archives

    func testBadChecksumIsRefusedWithItsOffset() async {
        var second = Self.header("disk.raw", size: 4)
        second[0] ^= 0x20 // a name byte changed after the checksum was computed
        await assertRefused(Self.member("a.ovf", [1]) + second + Self.padded([1, 2, 3, 4]) + Self.end,
                            offset: 1024, "tar header at offset 1024 has a bad checksum")
    }

    func testMemberRunningPastTheEndOfTheFile() async {
        let bytes = Self.member("a.ovf", [1]) + Self.header("disk.vmdk", size: 1 << 20) + Self.padded([1, 2, 3])
        await assertRefused(bytes, offset: 1024, "claims 1048576 bytes", "past the end of the file")
    }

    func testTruncatedHeader() async {
        let bytes = Self.member("a.ovf", [1]) + Array(Self.header("disk.vmdk", size: 0).prefix(300))
        await assertRefused(bytes, offset: 1024, "tar header at offset 1024 is truncated")
    }

    func testAbsurdSizes() async {
        // The largest octal size, and a base-256 one near 2^63: both past the end, no allocation.
        await assertRefused(Self.header("a", size: 0, sizeField: Array("77777777777\0".utf8)) + Self.end,
                            offset: 0, "claims 8589934591 bytes", "past the end")
        var huge = [UInt8](repeating: 0xff, count: 12)
        huge[0] = 0x80
        huge[1] = 0
        huge[2] = 0
        huge[3] = 0
        huge[4] = 0x7f
        await assertRefused(Self.header("a", size: 0, sizeField: huge, gnu: true) + Self.end, offset: 0, "past the end")
        // More than 63 bits, and negative base-256: an invalid field.
        await assertRefused(Self.header("a", size: 0, sizeField: [0x80] + [UInt8](repeating: 0xff, count: 11), gnu: true) + Self.end,
                            offset: 0, "invalid size field")
        await assertRefused(Self.header("a", size: 0, sizeField: [UInt8](repeating: 0xff, count: 12), gnu: true) + Self.end,
                            offset: 0, "invalid size field")
        await assertRefused(Self.header("a", size: 0, sizeField: Array("12x4\0\0\0\0\0\0\0\0".utf8)) + Self.end,
                            offset: 0, "invalid size field")
        // A GNU long name or PAX header larger than any name: refused before it is read.
        await assertRefused(Self.header("././@LongLink", size: 1 << 20, type: UInt8(ascii: "L"), gnu: true)
                            + [UInt8](repeating: 0x61, count: 1 << 20) + Self.end, offset: 0, "long name", "at most 4096")
        await assertRefused(Self.header("p", size: 100 << 10, type: UInt8(ascii: "x"))
                            + [UInt8](repeating: 0x61, count: 100 << 10) + Self.end, offset: 0, "PAX header", "at most")
    }

    func testNamesLeavingTheArchiveAreRefused() async {
        await assertRefused(Self.member("a.ovf", [1]) + Self.member("../etc/disk.vmdk", [2]) + Self.end,
                            offset: 1024, "'../etc/disk.vmdk'", "'..'")
        await assertRefused(Self.member("/abs.vmdk", [2]) + Self.end, offset: 0, "absolute")
        let records = Self.pax("path", "a/../../x.raw")
        await assertRefused(Self.header("h", size: Int64(records.count), type: UInt8(ascii: "x")) + Self.padded(records)
                            + Self.member("x.raw", [1]) + Self.end, offset: 0, "'..'")
    }

    func testNotATarAndOtherStructuralErrors() async {
        var v7 = Self.header("a", size: 0)
        for i in 257 ..< 265 { v7[i] = 0 }
        await assertRefused(v7 + Self.end, offset: 0, "no ustar magic")
        await assertRefused(Self.member("a", [1]) + Self.member("a", [2]) + Self.end, offset: 1024, "appears twice")
        await assertRefused(Self.header("bad-pax", size: 5, type: UInt8(ascii: "x")) + Self.padded(Array("99 x\n".utf8))
                            + Self.member("x", [1]) + Self.end, offset: 0, "malformed record")
        await assertRefused(Self.header("L", size: 2, type: UInt8(ascii: "L"), gnu: true) + Self.padded([0x61, 0]) + Self.end,
                            offset: 1024, "extension header with no member")
    }

    func testMemberCountIsBounded() async throws {
        let one = Self.header("f", size: 0)
        var bytes: [UInt8] = []
        bytes.reserveCapacity((TarArchive.maxMembers + 1) * 512 + 1024)
        for i in 0 ... TarArchive.maxMembers {
            var h = one
            let name = Array("f\(i)".utf8)
            for (j, b) in name.enumerated() { h[j] = b }
            for j in 148 ..< 156 { h[j] = UInt8(ascii: " ") }
            let sum = h.reduce(0) { $0 + Int64($1) }
            for (j, b) in (Self.octal(sum, 7) + [UInt8(ascii: " ")]).enumerated() { h[148 + j] = b }
            bytes += h
        }
        await assertRefused(bytes + Self.end, offset: Int64(TarArchive.maxMembers) * 512, "more than 10000 members")
    }

    /// Random damage to every header field, with the checksum fixed up afterwards so the
    /// parser sees it: every outcome is a table or a `FerryError`, never a trap, and every
    /// member listed lies inside the file.
    func testRandomlyDamagedHeadersNeverTrap() async throws {
        let long = String(repeating: "l", count: 120)
        var base = Self.header("././@LongLink", size: Int64(long.utf8.count), type: UInt8(ascii: "L"), gnu: true)
            + Self.padded(Array(long.utf8))
        base += Self.header("ignored", size: 700) + Self.padded([UInt8](repeating: 3, count: 700))
        let records = Self.pax("path", "p/disk.raw") + Self.pax("size", "10")
        base += Self.header("PaxHeaders/x", size: Int64(records.count), type: UInt8(ascii: "x")) + Self.padded(records)
        base += Self.header("x", size: 0) + Self.padded([UInt8](repeating: 4, count: 10))
        base += Self.member("a.ovf", [1, 2, 3]) + Self.end
        let headers = stride(from: 0, to: base.count - 1024, by: 512).filter { base[$0 + 257] == UInt8(ascii: "u") }
        var rng: UInt64 = 0x9e3779b97f4a7c15
        func next() -> Int {
            rng ^= rng << 13
            rng ^= rng >> 7
            rng ^= rng << 17
            return Int(truncatingIfNeeded: rng >> 1)
        }
        var accepted = 0
        for _ in 0 ..< 3000 {
            var bytes = base
            let h = headers[next() % headers.count]
            for _ in 0 ... next() % 4 {
                let at = next() % 2 == 0 ? h + next() % 512 : h + [124, 125, 134, 135, 156, 0, 99, 257][next() % 8]
                bytes[at] = next() % 3 == 0 ? 0xff : UInt8(truncatingIfNeeded: next())
            }
            // A data byte of an extension header, sometimes.
            if next() % 3 == 0 { bytes[512 + next() % 1024] = UInt8(truncatingIfNeeded: next()) }
            for j in 148 ..< 156 { bytes[h + j] = UInt8(ascii: " ") }
            let sum = bytes[h ..< h + 512].reduce(Int64(0)) { $0 + Int64($1) }
            for (j, b) in (Self.octal(sum, 7) + [UInt8(ascii: " ")]).enumerated() { bytes[h + 148 + j] = b }
            if next() % 5 == 0 { bytes.removeLast(next() % 2048) }
            do {
                let a = try await read(bytes)
                accepted += 1
                for m in a.members {
                    XCTAssertTrue(m.dataOffset >= 0 && m.size >= 0 && m.dataOffset + m.size <= Int64(bytes.count), "\(m)")
                }
            } catch is FerryError {
            }
        }
        XCTAssertGreaterThan(accepted, 0)
    }

    // MARK: - Manifest, descriptor and digests

    func testManifestLinesAndDescriptorReferences() throws {
        let m = TarMember(name: "a.mf", kind: .file, headerOffset: 0, dataOffset: 512, size: 0)
        let text = "SHA1(a.ovf)= " + String(repeating: "ab", count: 20) + "\nSHA256(disk 1.vmdk)=" + String(repeating: "0F", count: 32) + "\r\n\n"
        let entries = try OVAPackage.parseManifest(Array(text.utf8), member: m, path: "x.ova")
        XCTAssertEqual(entries.map(\.0), ["a.ovf", "disk 1.vmdk"])
        XCTAssertEqual(entries.map(\.1), [.sha1, .sha256])
        XCTAssertEqual(entries[1].2, String(repeating: "0f", count: 32))
        XCTAssertThrowsError(try OVAPackage.parseManifest(Array("SHA256(a)= 12\n".utf8), member: m, path: "x.ova")) { e in
            XCTAssertTrue("\(e)".contains("line 1"), "\(e)")
        }
        XCTAssertThrowsError(try OVAPackage.parseManifest(Array("MD5(a)= 00\n".utf8), member: m, path: "x.ova"))

        let ovf = """
        <?xml version="1.0"?><Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
        <ovf:References><ovf:File ovf:id="file1" ovf:href="disk1.vmdk" ovf:size="5"/>
        <File ovf:href='disk2.vmdk' ovf:compression="gzip" /></ovf:References>
        <DiskSection><Disk ovf:fileRef="file1" ovf:href="not-a-reference"/></DiskSection></Envelope>
        """
        let refs = OVF.references(Array(ovf.utf8))
        XCTAssertEqual(refs.map(\.0), ["disk1.vmdk", "disk2.vmdk"])
        XCTAssertEqual(refs.map(\.1), [nil, "gzip"])
    }

    func testDigestsAgreeWithSha1sumAndSha256sum() async throws {
        let bytes: [UInt8] = (0 ..< 3_000_000).map { (i: Int) -> UInt8 in UInt8(truncatingIfNeeded: i * 7 + i / 1000) }
        let dev = try await device(bytes)
        let path = NSTemporaryDirectory() + "ferry-digest-\(UUID().uuidString)"
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes[100 ..< 2_500_100])))
        defer { try? FileManager.default.removeItem(atPath: path) }
        for (algorithm, tool) in [(DigestAlgorithm.sha1, "sha1sum"), (.sha256, "sha256sum"), (.sha512, "sha512sum")] {
            let ours = try await Digest.hash(dev, range: 100 ..< 2_500_100, algorithm: algorithm)
            let p = Process()
            let pipe = Pipe()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/" + tool)
            p.arguments = [path]
            p.standardOutput = pipe
            try p.run()
            let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            XCTAssertEqual(ours, String(out.prefix(while: { $0 != " " })), tool)
            // The same through a device of 4 KiB blocks and 8 KiB transfers: the unaligned ends
            // are read whole and cut.
            let aligned = MemoryDevice(name: "aligned", size: Int64(bytes.count),
                                       limits: BlockLimits(alignment: 4096, preferredTransfer: 8192, maximumTransfer: 8192))
            try await aligned.write(at: 0, bytes: bytes)
            let again = try await Digest.hash(aligned, range: 100 ..< 2_500_100, algorithm: algorithm)
            XCTAssertEqual(again, ours, tool)
        }
    }
}
