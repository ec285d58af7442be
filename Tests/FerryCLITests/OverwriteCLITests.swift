import Foundation
import XCTest
import CFerryLinux

/// `convert` over an existing local target: closing the target must not start write-back of
/// what was just written (ext4 does that for a file truncated to zero through the descriptor
/// being closed), or an unflushed overwrite takes two to three times as long as a fresh copy.
final class OverwriteCLITests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws { dir = try makeScratchDirectory("overwrite") }
    override func tearDownWithError() throws { if let dir { try? FileManager.default.removeItem(at: dir) } }

    func testUnflushedOverwriteLeavesTheTargetDirty() throws {
        guard ferry_cached_bytes(-1) != -Int64(ENOSYS) else { throw XCTSkip("no cachestat(2) (Linux before 6.5)") }
        let fs = try Tools.run("/usr/bin/stat", ["-f", "-c", "%T", dir.path], in: dir)
        guard fs.stdout.hasPrefix("ext2") else { throw XCTSkip("not on ext4 (\(fs.stdout))") }
        let size = 64 << 20
        let src = dir.appendingPathComponent("src.raw").path
        // Data everywhere, none of it zeros, so every byte is written.
        let block = Data((0 ..< (1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 1) })
        var all = Data()
        for _ in 0 ..< size >> 20 { all.append(block) }
        XCTAssertTrue(FileManager.default.createFile(atPath: src, contents: all))
        for (format, extra) in [("raw", [String]()), ("qcow2", []), ("vpc", ["-o", "subformat=fixed"])] {
            let dst = dir.appendingPathComponent("dst.\(format)").path
            // The first copy makes the target; the second overwrites it.
            try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", format] + extra + [src, dst], in: dir)
            try Tools.must("sync", [], in: dir)
            let r = try Tools.ferry(["convert", "-q", "-t", "unsafe", "-f", "raw", "-O", format] + extra + [src, dst], in: dir)
            XCTAssertEqual(r.status, 0, r.stderr)
            let fd = open(dst, O_RDONLY)
            var st = ferry_cache_state()
            XCTAssertEqual(ferry_cachestat(fd, &st), 0)
            close(fd)
            XCTAssertGreaterThan(st.dirty, Int64(size / 2),
                                 "\(format): \(st.dirty) of \(size) bytes still dirty after ferry exited, \(st.writeback) under write-back")
            try Tools.must("qemu-img", ["compare", "-f", "raw", "-F", format, src, dst], in: dir)
        }
    }
}
