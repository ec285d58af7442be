import Foundation
import XCTest

/// `ferry` against `qemu-img` (and libvhdi's `vhdiinfo`) on VHDX images qemu-img made:
/// `convert` copies what qemu-img copies, `info` and `map` print the same bytes.
final class VHDXCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("vhdx") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    /// Dynamic images of several block sizes, a fixed one, one of an odd size. Names relative
    /// to `dir`.
    func buildImages() throws -> [String] {
        let writes = ["write -P 0xab 0 4k", "write -P 0x11 1M 3M", "write -z 8M 1M", "write -P 0x22 300M 2M"]
        var names: [String] = []
        for (name, options, size) in [("dyn.vhdx", "", "1G"), ("dyn1m.vhdx", "block_size=1M", "400M"),
                                      ("nozero.vhdx", "block_size=16M,block_state_zero=off", "400M"),
                                      ("fixed.vhdx", "subformat=fixed,block_size=1M", "320M"),
                                      ("odd.vhdx", "block_size=2M", "400000512")] {
            var args = ["create", "-q", "-f", "vhdx"]
            if !options.isEmpty { args += ["-o", options] }
            try Tools.must("qemu-img", args + [name, size], in: dir)
            try Tools.must("qemu-io", ["-f", "vhdx"] + writes.flatMap { ["-c", $0] } + [name], in: dir)
            names.append(name)
        }
        return names
    }

    func testInfoAndMapMatchQemuImg() throws {
        let qemu = try Tools.require("qemu-img")
        var images = try buildImages()
        images.append(dir.appendingPathComponent("dyn.vhdx").path)   // an absolute name too
        for image in images {
            for c in [["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]] {
                let theirs = try Tools.run(qemu, c + [image], in: dir)
                let ours = try Tools.ferry(c + [image], in: dir)
                XCTAssertEqual(ours.stdout, theirs.stdout, "ferry \(c.joined(separator: " ")) \(image) differs from qemu-img")
                XCTAssertEqual(ours.status == 0, theirs.status == 0, "ferry \(c.joined(separator: " ")) \(image): \(ours.stderr)")
                if theirs.status == 0 { XCTAssertEqual(ours.stderr, "", "ferry \(c.joined(separator: " ")) \(image)") }
            }
        }
    }

    func testConvertToRawAndQcow2() throws {
        let qemu = try Tools.require("qemu-img")
        for image in try buildImages() {
            for target in ["raw", "qcow2"] {
                let out = "\(image).\(target)"
                let r = try Tools.ferry(["convert", "-O", target, image, out], in: dir)
                XCTAssertEqual(r.status, 0, "ferry convert \(image) -> \(target): \(r.stderr)")
                let cmp = try Tools.run(qemu, ["compare", "-f", "vhdx", "-F", target, image, out], in: dir)
                XCTAssertEqual(cmp.status, 0, "\(image) -> \(target): \(cmp.stdout) \(cmp.stderr)")
            }
            // Sparse in, sparse out: the data written, not the virtual size.
            if image != "fixed.vhdx" {
                XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent("\(image).raw").path), 64 << 20, image)
            }
        }
    }

    /// A VHDX is probed by its signature (no -f), and libvhdi reads the same image.
    func testProbedAndReadByVhdiinfo() throws {
        _ = try buildImages()
        let r = try Tools.ferry(["info", "--output=json", "dyn1m.vhdx"], in: dir)
        XCTAssertTrue(r.stdout.contains("\"format\": \"vhdx\""), r.stdout)
        let info = try Tools.must("vhdiinfo", ["dyn1m.vhdx"], in: dir)
        XCTAssertTrue(info.contains("419430400"), info)
    }

    /// raw -> VHDX with each set of qemu-img's options: qemu-img check and compare pass,
    /// vhdiinfo reads the result, zero runs stay unallocated.
    func testConvertToVHDX() throws {
        let qemu = try Tools.require("qemu-img")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", "src.raw", "1000001536"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 3 0 5M", "-c", "write -P 4 900M 1M", "-c", "write -P 5 500M 33M",
                                   "-c", "write -P 6 77M 512", "src.raw"], in: dir)
        for options in ["", "block_size=1M", "block_state_zero=off,log_size=4M", "subformat=fixed,block_size=4M", "block_size=256M"] {
            let out = "out.vhdx"
            try? FileManager.default.removeItem(at: dir.appendingPathComponent(out))
            let r = try Tools.ferry(["convert", "-O", "vhdx"] + (options.isEmpty ? [] : ["-o", options]) + ["src.raw", out], in: dir)
            XCTAssertEqual(r.status, 0, "\(options): \(r.stderr)")
            let check = try Tools.run(qemu, ["check", out], in: dir)
            XCTAssertEqual(check.status, 0, "\(options): \(check.stdout) \(check.stderr)")
            let cmp = try Tools.run(qemu, ["compare", "-F", "vhdx", "src.raw", out], in: dir)
            XCTAssertEqual(cmp.status, 0, "\(options): \(cmp.stdout) \(cmp.stderr)")
            let theirs = try Tools.run(qemu, ["info", "--output=json", out], in: dir)
            let ours = try Tools.ferry(["info", "--output=json", out], in: dir)
            XCTAssertEqual(ours.stdout, theirs.stdout, options)
            if !options.contains("fixed") && !options.contains("256M") {
                XCTAssertLessThan(allocatedBytes(dir.appendingPathComponent(out).path), 100 << 20, options)
            }
            if options == "block_size=1M" {
                let info = try Tools.must("vhdiinfo", [out], in: dir)
                XCTAssertTrue(info.contains("1000001536"), info)
                // And back: Ferry reads what it wrote.
                let back = try Tools.ferry(["convert", "-O", "raw", out, "back.raw"], in: dir)
                XCTAssertEqual(back.status, 0, back.stderr)
                try Tools.must("qemu-img", ["compare", "-f", "raw", "-F", "raw", "src.raw", "back.raw"], in: dir)
            }
        }
        // A bad option is refused before anything is made.
        let bad = try Tools.ferry(["convert", "-O", "vhdx", "-o", "block_size=3M", "src.raw", "bad.vhdx"], in: dir)
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("invalid block_size '3M'"), bad.stderr)
        XCTAssertFalse(fileExists(dir.appendingPathComponent("bad.vhdx").path))
    }

    /// A copy that fails part way (a source whose BAT points past its end) leaves no VHDX
    /// behind; with O_DIRECT (`-t none`) the image is written as well.
    func testFailedCopyLeavesNoImageAndDirectIOWorks() throws {
        let qemu = try Tools.require("qemu-img")
        try Tools.must("qemu-img", ["create", "-q", "-f", "vhdx", "-o", "block_size=1M", "src.vhdx", "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "vhdx", "-c", "write -P 9 0 64M", "src.vhdx"], in: dir)
        let direct = try Tools.ferry(["convert", "-t", "none", "-O", "vhdx", "-o", "block_size=2M", "src.vhdx", "direct.vhdx"], in: dir)
        XCTAssertEqual(direct.status, 0, direct.stderr)
        try Tools.must("qemu-img", ["check", "direct.vhdx"], in: dir)
        try Tools.must("qemu-img", ["compare", "src.vhdx", "direct.vhdx"], in: dir)
        // Break block 40's BAT entry (the BAT is at 2 MiB in qemu-img's layout).
        let h = try FileHandle(forUpdating: dir.appendingPathComponent("src.vhdx"))
        try h.seek(toOffset: (2 << 20) + 40 * 8)
        try h.write(contentsOf: Data([6, 0, 0, 0, 0, 0, 0, 1]))
        try h.close()
        let r = try Tools.ferry(["convert", "-O", "vhdx", "src.vhdx", "out.vhdx"], in: dir)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("BAT entry 40"), r.stderr)
        let info = try Tools.run(qemu, ["info", "out.vhdx"], in: dir)
        XCTAssertNotEqual(info.status, 0, "a failed copy left an image: \(info.stdout)")
    }
}
