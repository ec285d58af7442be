import Foundation
import XCTest

/// The convert flags scripts pass to qemu-img: qemu-img 10's long names, -U, -r, --salvage,
/// -C, SIGUSR1 and --progress=fd:N, each judged by what it does to the copy.
final class ConvertFlagsCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("flags") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// 8 MiB: data, a hole, data that is all zeros, data.
    func source() throws -> String {
        try TestImage(name: "src.raw", size: 8 << 20, writes: [
            "write -P 0x11 0 2M", "write -z 4M 1M", "write -P 0x22 5M 3M",
        ]).build(in: dir)
    }

    func testQemuImg10LongNamesMeanWhatTheShortOnesDo() throws {
        let src = try source()
        let base = path("base.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", base, "8M"], in: dir)
        let r = try Tools.ferry(["convert", "--source-format", "raw", "--target-format", "qcow2",
                                 "--target-format-options", "cluster_size=128k", "--parallel", "4", "--oob-writes",
                                 "--sparse-size", "64k", "--target-cache", "unsafe", "--source-cache", "writeback",
                                 "-b", base, "--backing-format", "qcow2", "--progress", "--quiet",
                                 src, path("long.qcow2")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(r.stderr, "", "--quiet")
        let info = try Tools.must("qemu-img", ["info", "--output=json", path("long.qcow2")], in: dir)
        XCTAssertTrue(info.contains("\"cluster-size\": 131072"), info)
        XCTAssertTrue(info.contains("\"backing-filename\": \"\(base)\""), info)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", src, path("long.qcow2")], in: dir)
        let mapped = try Tools.ferry(["map", "--format", "raw", "--output", "json", src], in: dir)
        let reference = try Tools.must("qemu-img", ["map", "-f", "raw", "--output=json", src], in: dir)
        XCTAssertEqual(mapped.stdout.trimmingCharacters(in: .whitespacesAndNewlines), reference.trimmingCharacters(in: .whitespacesAndNewlines))
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", path("existing.raw"), "8M"], in: dir)
        let existing = try Tools.ferry(["convert", "--no-create", "--target-is-zero", "--source-format", "raw", src, path("existing.raw")], in: dir)
        XCTAssertEqual(existing.status, 0, existing.stderr)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, path("existing.raw")], in: dir)
    }

    /// An image held by another qemu process for writing is refused, as qemu-img refuses
    /// it, unless -U.
    func testImageInUseIsRefusedUnlessForceShare() throws {
        let src = try source()
        let img = path("busy.qcow2")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", src, img], in: dir)
        let holder = try Tools.start(try Tools.require("qemu-io"), ["-c", "sleep 20000", img], in: dir)
        defer { holder.signal(SIGKILL); _ = try? holder.wait(timeout: 5) }
        // Wait for its locks.
        var held = false
        for _ in 0 ..< 200 where !held {
            held = (try? String(contentsOfFile: "/proc/locks", encoding: .utf8))?.contains("OFDLCK") ?? false
            if !held { usleep(20_000) }
        }
        XCTAssertTrue(held, "qemu-io took its locks")
        for args in [["info", img], ["map", img], ["convert", img, path("out.raw")]] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.contains("another process (a running VM?) has the image open for writing"), r.stderr)
            XCTAssertTrue(r.stderr.contains("use -U"), r.stderr)
            let u = try Tools.ferry([args[0], "-U"] + args.dropFirst(), in: dir)
            XCTAssertEqual(u.status, 0, "\(args) -U: \(u.stderr)")
        }
        try Tools.must("qemu-img", ["compare", "-q", "-U", "-f", "raw", "-F", "qcow2", path("out.raw"), img], in: dir)
    }

    /// -r 4M on 5 MiB of data: at least about 1.2 s, however fast the machine, and the data
    /// exact. Zero runs are not counted.
    func testRateLimitHoldsTheCopyBack() throws {
        let src = try source()
        let start = Date()
        let r = try Tools.ferry(["convert", "-q", "-r", "4M", "--buffer-size", "256k", "-f", "raw", src, path("slow.raw")], in: dir)
        let took = Date().timeIntervalSince(start)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertGreaterThan(took, 1.1, "5 MiB at 4 MiB/s")
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, path("slow.raw")], in: dir)
        let bad = try Tools.ferry(["convert", "-r", "0", "-f", "raw", src, path("x.raw")], in: dir)
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("invalid rate limit '0'"), bad.stderr)
    }

    /// A compressed qcow2 with a damaged cluster: without --salvage the copy fails and leaves
    /// nothing; with it, Ferry writes what qemu-img --salvage writes and says where.
    func testSalvageWritesZerosWhereTheSourceCannotBeRead() throws {
        let raw = try TestImage(name: "text.raw", size: 4 << 20, writes: [
            "write -P 0x41 0 1M", "write -P 0x42 1M 1M", "write -P 0x43 2M 1M", "write -P 0x44 3M 1M",
        ]).build(in: dir)
        let img = path("damaged.qcow2")
        try Tools.must("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", raw, img], in: dir)
        // Garble the deflate stream of guest cluster 20 (64 KiB clusters): its L2 entry, under
        // L1[0], holds the host offset in its low 54 bits.
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: img))
        func be64(at offset: UInt64) throws -> UInt64 {
            try h.seek(toOffset: offset)
            return try h.read(upToCount: 8)!.reduce(0) { $0 << 8 | UInt64($1) }
        }
        let l1 = try be64(at: 40)
        let l2 = try be64(at: l1) & 0x00ff_ffff_ffff_fe00
        let entry = try be64(at: l2 + 20 * 8)
        XCTAssertEqual(entry >> 62, 1, "cluster 20 is compressed")
        try h.seek(toOffset: (entry & ((1 << 54) - 1)) + 2)
        try h.write(contentsOf: Data(repeating: 0xFF, count: 24))
        try h.close()

        let plain = try Tools.ferry(["convert", "-f", "qcow2", img, path("plain.raw")], in: dir)
        XCTAssertEqual(plain.status, 1, plain.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path("plain.raw")))

        let r = try Tools.ferry(["convert", "-q", "--salvage", "-f", "qcow2", img, path("salvaged.raw")], in: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        let warnings = r.stderr.split(separator: "\n").filter { $0.contains("could not read") }
        XCTAssertFalse(warnings.isEmpty, "the lost range is reported even with -q: \(r.stderr)")
        XCTAssertTrue(warnings.allSatisfy { $0.contains("wrote zeros there (--salvage)") }, r.stderr)
        try Tools.must("qemu-img", ["convert", "--salvage", "-f", "qcow2", "-O", "raw", img, path("qemu.raw")], in: dir)
        let same = try Tools.run(try Tools.require("cmp"), [path("salvaged.raw"), path("qemu.raw")], in: dir)
        XCTAssertEqual(same.status, 0, "the same bytes as qemu-img --salvage: \(same.stdout)")
        let differs = try Tools.run(try Tools.require("cmp"), [path("salvaged.raw"), raw], in: dir)
        XCTAssertEqual(differs.status, 1, "some data was lost")
    }

    /// What Ferry lacks is refused by name and listed in the help, never accepted and ignored.
    func testUnsupportedQemuImgOptionsAreRefused() throws {
        let src = try source()
        for (flags, message) in [(["--object", "secret,id=s0,data=x"], "--object is not supported")] {
            let r = try Tools.ferry(["convert"] + flags + ["-f", "raw", src, path("no.raw")], in: dir)
            XCTAssertEqual(r.status, 1, "\(flags)")
            XCTAssertTrue(r.stderr.contains(message), r.stderr)
            XCTAssertFalse(FileManager.default.fileExists(atPath: path("no.raw")))
        }
        let help = try Tools.ferry(["convert", "--help"], in: dir).stdout
        XCTAssertTrue(help.contains("Not supported, and refused rather than ignored: --object"), help)
    }

    /// -C: the data goes through copy_file_range(2) (seen by strace), and arrives exact.
    func testCopyOffloadUsesCopyFileRange() throws {
        let src = try source()
        let strace = try Tools.require("strace")
        let ferry = try Tools.require("ferry")
        for (flags, expectCalls) in [(["-C"], true), ([], false)] {
            let log = path("strace-\(expectCalls).log")
            let out = path("off-\(expectCalls).raw")
            let r = try Tools.run(strace, ["-f", "-e", "trace=copy_file_range", "-o", log, ferry, "convert", "-q"] + flags
                                  + ["-f", "raw", src, out], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let calls = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").filter { $0.contains("copy_file_range(") }
            if expectCalls {
                XCTAssertFalse(calls.isEmpty, "-C copies with copy_file_range")
                XCTAssertTrue(calls.allSatisfy { !$0.contains("= -1") }, calls.joined(separator: "\n"))
            } else {
                XCTAssertTrue(calls.isEmpty, "without -C, no copy_file_range: \(calls)")
            }
            try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, out], in: dir)
        }
        // Into qcow2 there is nothing to offload to: the copy is done the usual way.
        let q = try Tools.ferry(["convert", "-q", "-C", "-f", "raw", "-O", "qcow2", src, path("off.qcow2")], in: dir)
        XCTAssertEqual(q.status, 0, q.stderr)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", src, path("off.qcow2")], in: dir)
    }

    /// SIGUSR1 prints qemu-img's `    (NN.NN/100%)` line on stderr and the copy goes on;
    /// --progress=fd:N writes the JSON lines to descriptor N, not stdout.
    func testSIGUSR1AndProgressOnADescriptor() throws {
        let src = try source()
        let p = try Tools.start(try Tools.require("ferry"), ["convert", "-q", "-r", "3M", "--buffer-size", "256k", "-f", "raw", src, path("usr1.raw")], in: dir)
        usleep(700_000)
        p.signal(SIGUSR1)
        usleep(300_000)
        p.signal(SIGUSR1)
        let r = try p.wait(timeout: 30)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertFalse(r.signalled)
        let lines = r.stderr.split(separator: "\n").filter { $0.hasPrefix("    (") && $0.hasSuffix("/100%)") }
        XCTAssertEqual(lines.count, 2, r.stderr)
        let percents = lines.compactMap { Double($0.dropFirst(5).prefix { $0 != "/" }) }
        XCTAssertEqual(percents.count, 2)
        XCTAssertTrue(percents[0] > 0 && percents[0] < 100 && percents[1] >= percents[0], "\(percents)")
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", src, path("usr1.raw")], in: dir)

        // The JSON lines on descriptor 3, a file the shell opened for ferry.
        let sh = try Tools.run("/bin/sh", ["-c", "exec 3>\"$1\"; exec \"$2\" convert --progress=fd:3 -f raw \"$3\" \"$4\"", "sh",
                                           path("progress.jsonl"), try Tools.require("ferry"), src, path("fd.raw")], in: dir)
        XCTAssertEqual(sh.status, 0, sh.stderr)
        XCTAssertEqual(sh.stdout, "", "nothing on stdout")
        let json = try String(contentsOfFile: path("progress.jsonl"), encoding: .utf8)
        XCTAssertTrue(json.split(separator: "\n").last?.contains("\"final\":true") ?? false, json)
        let closed = try Tools.ferry(["convert", "--progress=fd:97", "-f", "raw", src, path("fd2.raw")], in: dir)
        XCTAssertNotEqual(closed.status, 0)
        XCTAssertTrue(closed.stderr.contains("descriptor 97 is not open"), closed.stderr)
    }
}

/// `--image-opts`: qemu's option strings name the same images as locations and -f do.
final class ImageOptsCLITests: XCTestCase {
    var dir: URL!
    var nbdkit: RunningProcess?

    override func setUpWithError() throws { dir = try makeScratchDirectory("imageopts") }
    override func tearDownWithError() throws {
        nbdkit?.signal(SIGTERM)
        _ = try? nbdkit?.wait(timeout: 5)
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    func testOptionStringsOpenFilesAndExports() throws {
        let raw = try TestImage(name: "a,b.raw", size: 4 << 20, writes: ["write -P 0x31 0 1M", "write -P 0x32 3M 1M"]).build(in: dir)
        let img = path("img.qcow2")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, img], in: dir)

        // info and map: the same answers as with a path and -f.
        for (opts, plain) in [("driver=qcow2,file.filename=\(img)", ["-f", "qcow2", img]),
                              ("driver=qcow2,file.driver=file,file.filename=\(img)", ["-f", "qcow2", img]),
                              ("driver=file,filename=\(raw.replacingOccurrences(of: ",", with: ",,"))", ["-f", "raw", raw])] {
            for cmd in ["info", "map"] {
                let a = try Tools.ferry([cmd, "--output", "json", "--image-opts", opts], in: dir)
                XCTAssertEqual(a.status, 0, "\(opts): \(a.stderr)")
                let b = try Tools.ferry([cmd, "--output", "json"] + plain, in: dir)
                XCTAssertEqual(a.stdout, b.stdout, "\(cmd) \(opts)")
            }
        }

        // A qcow2 image served by nbdkit, read as driver=qcow2 over file.driver=nbd.
        let served = try Tools.nbdkit(["file", img], socket: "nbd", in: dir)
        nbdkit = served.server
        let sock = path("nbd.sock")
        for (i, opts) in ["driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=\(sock)",
                          "driver=qcow2,file.filename=\(served.url)"].enumerated() {
            let out = path("from-nbd-\(i).raw")
            let r = try Tools.ferry(["convert", "-q", "--image-opts", opts, out], in: dir)
            XCTAssertEqual(r.status, 0, "\(opts): \(r.stderr)")
            try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", raw, out], in: dir)
        }

        // The target as an option string, into an existing image.
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", path("t.qcow2"), "4M"], in: dir)
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", path("t.raw"), "4M"], in: dir)
        let t = try Tools.ferry(["convert", "-q", "-n", "--target-image-opts", "-f", "qcow2", img, "driver=raw,file.filename=\(path("t.raw"))"], in: dir)
        XCTAssertEqual(t.status, 0, t.stderr)
        try Tools.must("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", raw, path("t.raw")], in: dir)

        // What is not understood is refused by name.
        for (args, message) in [
            (["info", "--image-opts", "driver=qcow2,file.filename=\(img),cache.direct=on"], "option 'cache.direct' is not supported"),
            (["info", "--image-opts", "driver=gluster,filename=x"], "driver 'gluster' is not supported"),
            (["info", "--image-opts", "file.filename=\(img)"], "names no driver"),
            (["info", "--image-opts", "driver=qcow2"], "needs filename"),
            (["info", "--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=\(img)"], "--image-opts and -f cannot be used together"),
            (["convert", "--target-image-opts", "-f", "qcow2", img, "driver=raw,file.filename=\(path("t.raw"))"], "--target-image-opts needs -n"),
        ] {
            let r = try Tools.ferry(args, in: dir)
            XCTAssertEqual(r.status, 1, "\(args)")
            XCTAssertTrue(r.stderr.contains(message), "\(args): \(r.stderr)")
        }
    }
}
