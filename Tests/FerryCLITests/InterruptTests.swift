import Foundation
import FerryTestServers
import XCTest

/// Stopping a copy: by a signal, and by the target running out of space.
final class InterruptTests: XCTestCase {
    var dir: URL!
    var mountPoint: String?

    override func setUpWithError() throws {
        dir = try makeScratchDirectory("interrupt")
    }

    override func tearDownWithError() throws {
        if let mountPoint { _ = try? Tools.run("/bin/umount", [mountPoint], in: dir) }
        if let dir { try? FileManager.default.removeItem(at: dir) }
    }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// A copy slow enough to interrupt: 256 MiB of data copied 4 KiB at a time by one worker,
    /// every write synchronous (O_DSYNC).
    func startSlowCopy() throws -> (RunningProcess, target: String) {
        let src = try TestImage(name: "big.raw", size: 512 << 20, writes: [
            "write -P 0x5a 0 128M", "write -P 0xa5 256M 128M",
        ]).build(in: dir)
        let dst = path("big-copy.raw")
        let p = try Tools.start(try Tools.require("ferry"),
                                ["convert", "--progress=json", "-f", "raw", "-m", "1", "--buffer-size", "4k", "-t", "writethrough", src, dst],
                                in: dir)
        // Wait until the copy is under way: the first progress line with data done.
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if p.stdoutSoFar.contains("\"final\":false") { break }
            XCTAssertTrue(p.process.isRunning, "the copy ended before it could be interrupted")
            if !p.process.isRunning { break }
            usleep(20_000)
        }
        return (p, dst)
    }

    func checkInterrupted(by sig: Int32, status: Int32) throws {
        let (p, dst) = try startSlowCopy()
        guard p.process.isRunning else { throw XCTSkip("copy finished too fast to interrupt") }
        let sentAt = Date()
        p.signal(sig)
        let r = try p.wait(timeout: 15)
        XCTAssertLessThan(Date().timeIntervalSince(sentAt), 5, "took too long to stop after the signal")
        XCTAssertFalse(r.signalled, "ferry died of the signal instead of handling it")
        XCTAssertEqual(r.status, status)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "expected one error line: \(r.stderr)")
        let line = String(lines.first ?? "")
        XCTAssertTrue(line.hasPrefix("ferry: "), line)
        XCTAssertTrue(line.lowercased().contains("cancel") || line.lowercased().contains("interrupt"), line)
        XCTAssertTrue(line.contains("offset"), "the message should say where the copy stopped: \(line)")
        XCTAssertFalse(fileExists(dst), "the half-written target was not removed")
        // The JSON progress ends with a final line naming the error.
        let last = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(last.contains("\"final\":true") && last.contains("\"error\""), last)
    }

    func testSIGINTStopsTheCopy() throws {
        try checkInterrupted(by: SIGINT, status: 130)
    }

    func testSIGTERMStopsTheCopy() throws {
        try checkInterrupted(by: SIGTERM, status: 143)
    }

    /// `ferry convert --progress=json ... | head -1`: the reader goes after the first line.
    /// The copy stops as if SIGPIPE had killed it (status 141), but cleanly: it says why, and
    /// the half-written target is removed (killed by the signal, it was left behind as
    /// `piped.qcow2.ferry-partial`).
    func testClosedOutputStopsTheCopyAndRemovesTheTarget() throws {
        let src = try TestImage(name: "big.raw", size: 512 << 20, writes: [
            "write -P 0x5a 0 128M", "write -P 0xa5 256M 128M",
        ]).build(in: dir)
        let dst = path("piped.qcow2")
        let script = "\"$0\" convert --progress=json -f raw -O qcow2 -m 1 --buffer-size 4k -t writethrough \"$1\" \"$2\" 2>err | head -n 1 >first; echo ${PIPESTATUS[0]} >status"
        let r = try Tools.run("/bin/bash", ["-c", script, try Tools.require("ferry"), src, dst], in: dir, timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        func read(_ name: String) -> String { (try? String(contentsOfFile: path(name), encoding: .utf8)) ?? "" }
        XCTAssertTrue(read("first").contains("\"final\":false"), "the reader saw a progress line: \(read("first"))")
        XCTAssertEqual(read("status").trimmingCharacters(in: .whitespacesAndNewlines), "141")
        let err = read("err")
        XCTAssertTrue(err.contains("ferry: the output was closed (broken pipe)"), err)
        XCTAssertTrue(err.contains("offset"), "the error should say where the copy stopped: \(err)")
        let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasPrefix("piped.qcow2") }
        XCTAssertEqual(left, [], "the half-written target was left behind")
    }

    /// `ferry map ... | head -n 1`: once the reader has gone, map stops with SIGPIPE's status
    /// (141), as qemu-img does, instead of dropping the rest of its answer and saying 0.
    func testClosedOutputEndsAPrintingCommandWithSIGPIPEStatus() throws {
        // 8,192 data runs of 4 KiB: a map of about 400 KB, far more than a pipe holds.
        var runs: [(Int64, Int, UInt8)] = []
        for k in 0 ..< 8192 { runs.append((Int64(k) * 8192, 4096, 0x11)) }
        let src = try makeSparseFile(path("runs.raw"), size: 64 << 20, data: runs)
        let script = "\"$0\" map -f raw \"$1\" 2>err | head -n 1 >first; echo ${PIPESTATUS[0]} >status"
        let r = try Tools.run("/bin/bash", ["-c", script, try Tools.require("ferry"), src], in: dir, timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        func read(_ name: String) -> String { (try? String(contentsOfFile: path(name), encoding: .utf8)) ?? "" }
        XCTAssertFalse(read("first").isEmpty, "the reader got the first line")
        XCTAssertEqual(read("status").trimmingCharacters(in: .whitespacesAndNewlines), "141")
        XCTAssertEqual(read("err"), "", "nothing to say on stderr")
        // The whole map, read to its end, still exits 0.
        let all = try Tools.ferry(["map", "-f", "raw", src], in: dir)
        XCTAssertEqual(all.status, 0, all.stderr)
        XCTAssertEqual(all.stdout.split(separator: "\n").count, 8193, "a header and a line per run")
    }

    /// A target on a 1 MiB tmpfs: the copy fails with ENOSPC, says so in one line naming the
    /// target and an offset, and removes the target. Needs permission to mount.
    func testNoSpaceLeftOnTarget() throws {
        let mnt = path("tiny")
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let m = try Tools.run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], in: dir)
        guard m.status == 0 else { throw XCTSkip("cannot mount a tmpfs here: \(m.stderr)") }
        mountPoint = mnt
        let src = try TestImage(name: "data.raw", size: 16 << 20, writes: [
            "write -P 0x42 0 2M", "write -P 0x43 6M 2M", "write -P 0x44 12M 2M",
        ]).build(in: dir)
        let dst = mnt + "/out.raw"
        let r = try Tools.ferry(["convert", "-f", "raw", src, dst], in: dir)
        XCTAssertEqual(r.status, 1)
        XCTAssertFalse(r.signalled)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, r.stderr)
        let line = String(lines.first ?? "")
        XCTAssertTrue(line.hasPrefix("ferry: \(dst)"), "should name the target first: \(line)")
        XCTAssertTrue(line.contains("No space left on device"), line)
        XCTAssertTrue(line.contains("offset"), line)
        XCTAssertFalse(fileExists(dst), "the failed target was not removed")
    }
}
