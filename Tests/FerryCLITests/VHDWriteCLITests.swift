import Foundation
import XCTest

/// VHD images written by `ferry convert -O vpc`: qemu-img and vhdiinfo read them, and they
/// hold what the source holds.
final class VHDWriteCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("vhd-write") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func source() throws -> String {
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", "src.qcow2", "1000000k"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xab 0 4k", "-c", "write -P 0x11 1M 3M", "-c", "write -P 0x22 5243392 3584",
                                   "-c", "write -P 0x33 975M 512k", "src.qcow2"], in: dir)
        return "src.qcow2"
    }

    func bytes(_ name: String, at offset: Int64, count: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: dir.appendingPathComponent(name))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(offset))
        return Array(try h.read(upToCount: count) ?? Data())
    }

    func be64(_ b: [UInt8], _ at: Int) -> Int64 { b[at ..< at + 8].reduce(Int64(0)) { $0 << 8 | Int64($1) } }

    func testEverySubformatReadsBackAsTheSource() throws {
        let qemu = try Tools.require("qemu-img")
        let src = try source()
        for (out, options, format) in [("d.vhd", "subformat=dynamic", ["-f", "vpc"]), ("f.vhd", "subformat=fixed", ["-f", "vpc"]),
                                       ("fs.vhd", "force_size=on", ["-f", "vpc"]), ("az.vhd", "azure=on", ["-f", "vpc"])] {
            let r = try Tools.ferry(["convert", "-O", "vpc", "-o", options, src, out], in: dir)
            XCTAssertEqual(r.status, 0, "\(options): \(r.stderr)")
            let cmp = try Tools.run(qemu, ["compare", "-F"] + [format[1], src, out], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(options): \(cmp.stdout)\(cmp.stderr)")
            // Ferry reads back what it wrote, and says what qemu-img says about it.
            for c in [["info", "--output=json"], ["map", "--output=json"]] {
                let theirs = try Tools.run(qemu, c + format + [out], in: dir)
                let ours = try Tools.ferry(c + format + [out], in: dir)
                XCTAssertEqual(ours.stdout, theirs.stdout, "\(options): \(c)")
                XCTAssertEqual(ours.status, 0, ours.stderr)
            }
            XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent(out).path), 32 << 20, "\(out) is not sparse")
        }
        // Sizes as qemu-img makes them: CHS-rounded by default, exact with force_size.
        let q = try Tools.run(qemu, ["create", "-q", "-f", "vpc", "q.vhd", "1000000k"], in: dir)
        XCTAssertEqual(q.status, 0)
        let theirs = try Tools.run(qemu, ["info", "--output=json", "q.vhd"], in: dir).stdout
        let ours = try Tools.run(qemu, ["info", "--output=json", "d.vhd"], in: dir).stdout
        func vsize(_ s: String) -> String { s.split(separator: "\n").first { $0.contains("virtual-size") }.map(String.init) ?? "" }
        XCTAssertEqual(vsize(ours), vsize(theirs))
        XCTAssertTrue(try Tools.run(qemu, ["info", "-f", "vpc", "--output=json", "fs.vhd"], in: dir).stdout.contains("\"virtual-size\": 1024000000,"))
    }

    /// azure=on: fixed, a whole number of MiB stated exactly in the footer, the footer last
    /// with a good checksum, the file exactly size + 512.
    func testAzureFooter() throws {
        let src = try source()
        let r = try Tools.ferry(["convert", "-O", "vpc", "-o", "azure=on", src, "az.vhd"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let mib: Int64 = 1 << 20
        let want = (1_024_000_000 + mib - 1) / mib * mib
        XCTAssertEqual(fileSize(dir.appendingPathComponent("az.vhd").path), want + 512)
        let footer = try bytes("az.vhd", at: want, count: 512)
        XCTAssertEqual(Array(footer[0 ..< 8]), Array("conectix".utf8))
        XCTAssertEqual(be64(footer, 48), want, "current size")
        XCTAssertEqual(be64(footer, 40), want, "original size")
        XCTAssertEqual(Array(footer[60 ..< 64]), [0, 0, 0, 2], "fixed")
        XCTAssertEqual(be64(footer, 16), -1, "data offset of a fixed disk")
        var sum: UInt32 = 0
        for (i, b) in footer.enumerated() where !(64 ..< 68).contains(i) { sum &+= UInt32(b) }
        XCTAssertEqual(footer[64 ..< 68].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }, ~sum, "checksum")
        XCTAssertEqual(want % mib, 0)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-F", "vpc", src, "az.vhd"], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
        XCTAssertTrue(try Tools.run(try Tools.require("qemu-img"), ["info", "-f", "vpc", "--output=json", "az.vhd"], in: dir).stdout
            .contains("\"virtual-size\": \(want),"))
        let bad = try Tools.ferry(["convert", "-O", "vpc", "-o", "azure=on,subformat=dynamic", src, "x.vhd"], in: dir)
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("azure=on writes a fixed vhd"), bad.stderr)
    }

    func testVhdiinfoReadsADynamicImage() throws {
        let vhdiinfo = try Tools.require("vhdiinfo")
        let src = try source()
        XCTAssertEqual(try Tools.ferry(["convert", "-O", "vpc", src, "d.vhd"], in: dir).status, 0)
        let r = try Tools.run(vhdiinfo, ["d.vhd"], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("Disk type\t\t: Dynamic"), r.stdout)
        let ours = try Tools.ferry(["info", "--output=json", "d.vhd"], in: dir).stdout
        guard let line = r.stdout.split(separator: "\n").first(where: { $0.contains("Media size") }),
              let open = line.lastIndex(of: "("), let n = Int64(line[line.index(after: open)...].split(separator: " ")[0]) else {
            return XCTFail("vhdiinfo shows no media size: \(r.stdout)")
        }
        XCTAssertTrue(ours.contains("\"virtual-size\": \(n),"), ours)
    }
}
