import Foundation
import XCTest

/// ferry against qemu-img on the same images: converted copies are judged by
/// `qemu-img compare` and by how much space they take; `map` and `info` must print what
/// qemu-img prints, byte for byte.
final class OracleTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = try makeScratchDirectory("oracle")
    }

    override func tearDownWithError() throws {
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    /// 64 MiB + 1536 bytes (a multiple of 512, not of 4096): patterns, zeros written as data,
    /// zeroed ranges, data at odd 512-aligned offsets, and a partial last block.
    static let mixed = TestImage(name: "mixed.raw", size: (64 << 20) + 1536, writes: [
        "write -P 0xab 0 64k",
        "write -P 0x11 1M 3M",
        "write -P 0x22 5243392 3584",
        "write -z 8M 1M",
        "write -P 0 10M 2M",
        "write -P 0x33 12595200 4608",
        "write -P 0x44 20M 66048",
        "write -P 0x55 30M 1M",
        "write -z 31719424 131072",
        "write -P 0 40M 512",
        "write -P 0x66 50M 8k",
        "write -P 0 50M 512",
        "write -P 0xcd 67108864 1536",
    ])
    /// 100 KiB + 512 bytes with two small runs, one at the very end.
    static let small = TestImage(name: "small.raw", size: 102_912, writes: [
        "write -P 0x77 4096 512",
        "write -P 0x78 98304 4608",
    ])
    /// 10 MiB without data.
    static let holes = TestImage(name: "holes.raw", size: 10 << 20, writes: [])
    /// Data everywhere, 2 MiB + 512 bytes.
    static let full = TestImage(name: "full.raw", size: (2 << 20) + 512, writes: ["write -P 0x99 0 2097664"])
    /// No bytes at all.
    static let empty = TestImage(name: "empty.raw", size: 0, writes: [])

    /// Slack allowed over the source's allocation: file systems allocate in 4 KiB blocks and
    /// may preallocate a little at the end of a file being written.
    static let slack: Int64 = 256 << 10

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// Converts `src` into `dst` with `args` and checks the copy with qemu-img compare, the
    /// summary line, and (unless `sparse` is false) that it takes no more room than `src`.
    func convertAndCheck(_ args: [String], src: String, dst: String, sparse: Bool = true,
                         file: StaticString = #filePath, line: UInt = #line) throws {
        let shown = "ferry convert \(args.joined(separator: " "))"
        let r = try Tools.ferry(["convert"] + args + ["-f", "raw", "-O", "raw", src, dst], in: dir)
        XCTAssertEqual(r.status, 0, "\(shown) failed: \(r.stderr)", file: file, line: line)
        guard r.status == 0 else { return }
        XCTAssertEqual(r.stdout, "", "\(shown) wrote to stdout", file: file, line: line)
        XCTAssertTrue(Self.isSummary(r.stderr), "\(shown): not one summary line: \(r.stderr)", file: file, line: line)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-f", "raw", "-F", "raw", src, dst], in: dir)
        XCTAssertEqual(cmp.status, 0, "\(shown): qemu-img compare: \(cmp.stdout)\(cmp.stderr)", file: file, line: line)
        if sparse {
            XCTAssertLessThanOrEqual(allocatedBytes(dst), allocatedBytes(src) + Self.slack,
                                     "\(shown): the copy takes more room than the source", file: file, line: line)
        }
    }

    static func isSummary(_ stderr: String) -> Bool {
        let pattern = #"^ferry: converted [0-9.]+ (B|KiB|MiB|GiB) in [0-9.]+ s \([0-9.]+ (B|KiB|MiB|GiB)/s\): read [0-9.]+ (B|KiB|MiB|GiB), wrote [0-9.]+ (B|KiB|MiB|GiB), zeroed [0-9.]+ (B|KiB|MiB|GiB), skipped [0-9.]+ (B|KiB|MiB|GiB)\n$"#
        return stderr.range(of: pattern, options: .regularExpression) != nil
    }

    // MARK: - convert

    func testConvertSettings() throws {
        let src = try Self.mixed.build(in: dir)
        let settings: [[String]] = [
            [],
            ["-W", "-m", "16"],
            ["-m", "1"],
            ["-S", "64k"],
            ["-S", "512"],
            ["--buffer-size", "64k"],
            ["-m", "3", "-W", "--buffer-size", "4k"],
            ["-t", "none"],
            ["-T", "none", "-t", "directsync"],
            ["-t", "writethrough"],
            ["-t", "unsafe", "-m", "16", "-W"],
        ]
        for (i, args) in settings.enumerated() {
            try convertAndCheck(args, src: src, dst: path("out\(i).raw"))
            try? FileManager.default.removeItem(atPath: path("out\(i).raw"))
        }
    }

    func testConvertEveryImage() throws {
        for image in [Self.mixed, Self.small, Self.holes, Self.full, Self.empty] {
            let src = try image.build(in: dir)
            let dst = path("copy-" + image.name)
            try convertAndCheck([], src: src, dst: dst)
            XCTAssertEqual(fileSize(dst), image.size, "\(image.name): size of the copy")
        }
        // A source without data gives a target without data.
        XCTAssertLessThanOrEqual(allocatedBytes(path("copy-holes.raw")), Self.slack)
    }

    /// `-S 0` writes every byte: the target is fully allocated.
    func testSparseZeroAllocatesEverything() throws {
        let src = try Self.mixed.build(in: dir)
        let dst = path("dense.raw")
        try convertAndCheck(["-S", "0"], src: src, dst: dst, sparse: false)
        XCTAssertGreaterThanOrEqual(allocatedBytes(dst), Self.mixed.size / 4096 * 4096,
                                    "-S 0 left holes in the target")
    }

    /// Explicit zeros in the source are not written with the default -S.
    func testZerosWrittenAsDataBecomeHoles() throws {
        let src = try TestImage(name: "zeros.raw", size: 8 << 20, writes: ["write -P 0 0 8M"]).build(in: dir)
        XCTAssertGreaterThanOrEqual(allocatedBytes(src), 8 << 20)
        let dst = path("zeros-copy.raw")
        try convertAndCheck([], src: src, dst: dst)
        XCTAssertLessThanOrEqual(allocatedBytes(dst), Self.slack)
    }

    /// -n onto an existing target full of other bytes: every byte of the source's size is
    /// rewritten, holes included; a larger target keeps its tail.
    func testExistingTargets() throws {
        let src = try Self.mixed.build(in: dir)
        let size = Self.mixed.size
        // Larger, garbage over the source's range, zeros (a hole) after it.
        let larger = try TestImage(name: "larger.raw", size: size + (1 << 20), writes: ["write -P 0xee 0 \(size)"]).build(in: dir)
        try convertAndCheck(["-n"], src: src, dst: larger, sparse: false)
        XCTAssertEqual(fileSize(larger), size + (1 << 20), "-n changed the target's size")

        // Equal size, garbage everywhere, out-of-order writes.
        let equal = try TestImage(name: "equal.raw", size: size, writes: ["write -P 0xef 0 \(size)"]).build(in: dir)
        try convertAndCheck(["-n", "-W", "-m", "16"], src: src, dst: equal, sparse: false)

        // A fresh target the user vouches for: holes are skipped, the result still matches.
        let zero = path("zero.raw")
        XCTAssertTrue(FileManager.default.createFile(atPath: zero, contents: nil))
        XCTAssertEqual(truncate(zero, off_t(size)), 0)
        try convertAndCheck(["-n", "--target-is-zero"], src: src, dst: zero)
    }

    func testPreallocationOptions() throws {
        let src = try Self.small.build(in: dir)
        for mode in ["off", "falloc", "full"] {
            let dst = path("prealloc-\(mode).raw")
            try convertAndCheck(["-o", "preallocation=\(mode)"], src: src, dst: dst, sparse: mode == "off")
            if mode != "off" {
                XCTAssertGreaterThanOrEqual(allocatedBytes(dst), Self.small.size / 4096 * 4096, "preallocation=\(mode)")
            }
        }
    }

    /// `ferry convert a b c out` is `cat a b c > out`.
    func testConcatenation() throws {
        let a = try TestImage(name: "a.raw", size: (1 << 20) + 512, writes: ["write -P 0x0a 4096 8k", "write -P 0x1a 1048576 512"]).build(in: dir)
        let b = try TestImage(name: "b.raw", size: 3072, writes: ["write -P 0x0b 0 3072"]).build(in: dir)
        let c = try TestImage(name: "c.raw", size: 2 << 20, writes: ["write -P 0x0c 2093056 4096"]).build(in: dir)
        let e = try Self.empty.build(in: dir)
        for (i, extra) in [[], ["-W", "-m", "16"], ["--buffer-size", "4k", "-m", "2"]].enumerated() {
            let out = path("cat\(i).raw")
            let r = try Tools.ferry(["convert", "-f", "raw"] + extra + [a, e, b, c, out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let expected = try [a, e, b, c].reduce(into: Data()) { $0.append(try Data(contentsOf: URL(fileURLWithPath: $1))) }
            let actual = try Data(contentsOf: URL(fileURLWithPath: out))
            XCTAssertEqual(actual.count, expected.count, "size of the concatenation")
            XCTAssertTrue(actual == expected, "ferry convert \(extra) a empty b c out differs from cat a empty b c")
        }
    }

    func testProbedRawWarnsAndQuietDoesNot() throws {
        let src = try Self.small.build(in: dir)
        let r = try Tools.ferry(["convert", src, path("w.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 2, r.stderr)
        XCTAssertTrue(lines.first?.hasPrefix("ferry: warning: ") ?? false, r.stderr)
        XCTAssertTrue(lines.first?.contains("-f raw") ?? false, r.stderr)
        XCTAssertTrue(Self.isSummary(String(lines.last ?? "") + "\n"), r.stderr)

        let q = try Tools.ferry(["convert", "-q", src, path("q.raw")], in: dir)
        XCTAssertEqual(q.status, 0, q.stderr)
        XCTAssertEqual(q.stderr, "")
        XCTAssertEqual(q.stdout, "")
    }

    /// -p draws only on a terminal; here stderr is a file, so only the summary appears.
    func testProgressBarNeedsATerminal() throws {
        let src = try Self.small.build(in: dir)
        let r = try Tools.ferry(["convert", "-p", "-f", "raw", src, path("p.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(Self.isSummary(r.stderr), r.stderr)
    }

    /// A 1 TiB sparse image with 3 MiB of data: planned from extents, so only the data is read
    /// and written and the copy stays sparse (memory and time follow the data, not the size).
    func testTerabyteSparseImage() throws {
        let src = try TestImage(name: "tera.raw", size: 1 << 40, writes: ["write -P 0x07 100G 1M", "write -P 0x08 900G 2M"]).build(in: dir)
        let r = try Tools.ferry(["convert", "-f", "raw", src, path("tera-out.raw")], in: dir, timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("read 3 MiB, wrote 3 MiB"), r.stderr)
        XCTAssertLessThanOrEqual(allocatedBytes(path("tera-out.raw")), allocatedBytes(src) + (64 << 10))
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-q", "-f", "raw", "-F", "raw", src, path("tera-out.raw")], in: dir, timeout: 120)
        XCTAssertEqual(cmp.status, 0)
    }

    /// On a terminal (a pty from util-linux `script`), -p redraws a bar in place: percent,
    /// bytes done of the data, rate and ETA, ending at 100%.
    func testProgressBarOnATerminal() throws {
        let ferry = try Tools.require("ferry")
        let script = try Tools.require("script")
        let src = try TestImage(name: "bar.raw", size: 32 << 20, writes: ["write -P 0x01 0 8M", "write -P 0x02 16M 8M"]).build(in: dir)
        let command = "\(ferry) convert -p -f raw -m 1 --buffer-size 64k -t writethrough \(src) \(path("bar-out.raw"))"
        let r = try Tools.run(script, ["-qfec", command, "/dev/null"], in: dir, timeout: 120)
        XCTAssertEqual(r.status, 0, r.stdout + r.stderr)
        let frames = r.stdout.split(separator: "\r").map(String.init).filter { $0.contains("%") && $0.contains("[") }
        XCTAssertGreaterThanOrEqual(frames.count, 1, "no progress bar drawn: \(r.stdout.debugDescription)")
        XCTAssertTrue(frames.contains { $0.contains("100.0%") && $0.contains("16 MiB / 16 MiB") }, frames.joined(separator: "\n"))
        XCTAssertTrue(frames.contains { $0.contains("/s") }, "frames carry a rate")
        XCTAssertTrue(r.stdout.contains("ferry: converted 32 MiB"), "the summary follows the bar")
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-q", "-f", "raw", "-F", "raw", src, path("bar-out.raw")], in: dir)
        XCTAssertEqual(cmp.status, 0)
    }

    func testProgressJSON() throws {
        // 48 MiB of data copied 64 KiB at a time by one worker with synchronous writes: slow
        // enough for several progress lines.
        let src = try TestImage(name: "p.raw", size: 96 << 20, writes: [
            "write -P 0x01 0 16M", "write -P 0x02 32M 16M", "write -P 0x03 80M 16M",
        ]).build(in: dir)
        let r = try Tools.ferry(["convert", "--progress=json", "-f", "raw", "-m", "1", "--buffer-size", "64k", "-t", "writethrough",
                                 src, path("pj.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n")
        XCTAssertGreaterThanOrEqual(lines.count, 2, "expected progress lines and a final one: \(r.stdout)")
        var lastDone: Int64 = -1
        var objects: [[String: Any]] = []
        for line in lines {
            guard let o = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else {
                XCTFail("not a JSON object: \(line)")
                continue
            }
            objects.append(o)
            let done = (o["done"] as? NSNumber)?.int64Value ?? -1
            XCTAssertGreaterThanOrEqual(done, lastDone, "done went backwards: \(line)")
            lastDone = done
            for key in ["total", "rate", "read", "written", "zeroed", "skipped", "elapsed", "final"] {
                XCTAssertNotNil(o[key], "\(key) missing in \(line)")
            }
        }
        guard let last = objects.last else { return }
        XCTAssertEqual(last["final"] as? Bool, true)
        XCTAssertEqual((last["done"] as? NSNumber)?.int64Value, (last["total"] as? NSNumber)?.int64Value, "final done != total")
        XCTAssertGreaterThanOrEqual((last["total"] as? NSNumber)?.int64Value ?? 0, 48 << 20)
        XCTAssertEqual((last["written"] as? NSNumber)?.int64Value, 48 << 20)
        XCTAssertEqual((last["depth"] as? NSNumber)?.intValue, 1, "-m 1 is kept")
        XCTAssertEqual((last["max_in_flight"] as? NSNumber)?.intValue, 128 << 20, "the default cap on bytes in flight")
        for o in objects.dropLast() { XCTAssertEqual(o["final"] as? Bool, false) }
        // --progress=json goes to stdout; the summary still goes to stderr.
        XCTAssertTrue(Self.isSummary(r.stderr), r.stderr)
        let cmp = try Tools.run(try Tools.require("qemu-img"), ["compare", "-q", "-f", "raw", "-F", "raw", src, path("pj.raw")], in: dir)
        XCTAssertEqual(cmp.status, 0)
    }

    /// `-m 1024` is held to `--max-in-flight` (8 MiB of the default 1 MiB buffers: 8 requests;
    /// of 2 MiB ones: 4), which the JSON progress reports; -W and --in-order contradict each other.
    func testBytesInFlightCapHoldsTheDepth() throws {
        let src = try TestImage(name: "cap.raw", size: 16 << 20, writes: ["write -P 0x05 0 16M"]).build(in: dir)
        let r = try Tools.ferry(["convert", "--progress=json", "-f", "raw", "-m", "1024", "--max-in-flight", "8M", src, path("cap-out.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let last = try XCTUnwrap(r.stdout.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] })
        XCTAssertEqual((last["depth"] as? NSNumber)?.intValue, 8)
        XCTAssertEqual((last["max_in_flight"] as? NSNumber)?.intValue, 8 << 20)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, path("cap-out.raw")], in: dir)
        let big = try Tools.ferry(["convert", "--progress=json", "-f", "raw", "-m", "1024", "--max-in-flight", "8M", "--buffer-size", "2M",
                                   src, path("cap-2m.raw")], in: dir)
        XCTAssertEqual(big.status, 0, big.stderr)
        let bigLast = try XCTUnwrap(big.stdout.split(separator: "\n").last.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] })
        XCTAssertEqual((bigLast["depth"] as? NSNumber)?.intValue, 4)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, path("cap-2m.raw")], in: dir)
        let both = try Tools.ferry(["convert", "-W", "--in-order", "-f", "raw", src, path("both.raw")], in: dir)
        XCTAssertNotEqual(both.status, 0)
        XCTAssertTrue(both.stderr.contains("-W and --in-order cannot be used together"), both.stderr)
        let small = try Tools.ferry(["convert", "--max-in-flight", "512k", "-f", "raw", src, path("small.raw")], in: dir)
        XCTAssertNotEqual(small.status, 0)
        XCTAssertTrue(small.stderr.contains("invalid bytes in flight 524288"), small.stderr)
    }

    // MARK: - map and info

    func testMapAndInfoMatchQemuImg() throws {
        var images: [String] = []
        for image in [Self.mixed, Self.small, Self.holes, Self.full, Self.empty] {
            images.append(try image.build(in: dir))
        }
        // A file ferry wrote.
        let copy = path("copy.raw")
        let r = try Tools.ferry(["convert", "-q", "-f", "raw", images[0], copy], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        images.append(copy)
        // Relative names are printed as given.
        images.append("small.raw")

        let qemu = try Tools.require("qemu-img")
        for image in images {
            for (command, output) in [("map", "--output=json"), ("map", "--output=human"), ("info", "--output=json"), ("info", "--output=human")] {
                let expected = try Tools.run(qemu, [command, "-f", "raw", output, image], in: dir)
                XCTAssertEqual(expected.status, 0, expected.stderr)
                let actual = try Tools.ferry([command, "-f", "raw", output, image], in: dir)
                XCTAssertEqual(actual.status, 0, actual.stderr)
                XCTAssertEqual(actual.stderr, "", "ferry \(command) -f raw \(output) \(image)")
                XCTAssertEqual(actual.stdout, expected.stdout, "ferry \(command) -f raw \(output) \(image) differs from qemu-img")
            }
        }
        // `--output json` is `--output=json`; without -f the output is the same plus a warning.
        let qemuMap = try Tools.run(qemu, ["map", "-f", "raw", "--output=json", images[0]], in: dir).stdout
        let spaced = try Tools.ferry(["map", "--output", "json", images[0]], in: dir)
        XCTAssertEqual(spaced.status, 0)
        XCTAssertEqual(spaced.stdout, qemuMap)
        XCTAssertTrue(spaced.stderr.hasPrefix("ferry: warning: ") && spaced.stderr.contains("-f raw"), spaced.stderr)
        XCTAssertEqual(spaced.stderr.filter { $0 == "\n" }.count, 1)
        let info = try Tools.ferry(["info", "--output", "json", images[0]], in: dir)
        XCTAssertEqual(info.stdout, try Tools.run(qemu, ["info", "-f", "raw", "--output=json", images[0]], in: dir).stdout)
        XCTAssertTrue(info.stderr.hasPrefix("ferry: warning: "), info.stderr)
        // The default output is human.
        XCTAssertEqual(try Tools.ferry(["map", "-f", "raw", images[0]], in: dir).stdout,
                       try Tools.run(qemu, ["map", "-f", "raw", images[0]], in: dir).stdout)
    }

    /// qemu-img prints names in JSON with its own escapes (`\u00E9`, `\t`, `\"`).
    func testInfoJSONEscapesNames() throws {
        let name = "we\"ird\tna\\me-é.raw"
        try Self.small.build(in: dir)
        XCTAssertEqual(rename(path("small.raw"), path(name)), 0)
        let qemu = try Tools.run(try Tools.require("qemu-img"), ["info", "-f", "raw", "--output=json", name], in: dir)
        let ours = try Tools.ferry(["info", "-f", "raw", "--output=json", name], in: dir)
        XCTAssertEqual(ours.status, 0, ours.stderr)
        XCTAssertEqual(ours.stdout, qemu.stdout)
    }
}
