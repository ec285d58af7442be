import Foundation
import XCTest
import CFerryLinux
import FerryCore
@testable import FerryFile

/// Creating a file over an existing one must not make closing it write the data back: ext4
/// (auto_da_alloc) does that for a file truncated to zero when a descriptor of it is closed,
/// which made an unflushed copy over an existing target two to three times slower.
final class OverwriteTests: FileTestCase {
    func testClosingAnOverwrittenFileLeavesItsDataDirty() async throws {
        guard ferry_cached_bytes(-1) != -Int64(ENOSYS) else { throw XCTSkip("no cachestat(2) (Linux before 6.5)") }
        guard run("/usr/bin/stat", "-f", "-c", "%T", dir).output.hasPrefix("ext2") else {
            throw XCTSkip("not on ext4, whose close-after-truncate write-back this is about")
        }
        let p = path("target.img")
        let size = 256 << 20
        let chunk = (0 ..< (4 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        for engine in engines {
            // An existing target with data in it, written back and clean.
            XCTAssertTrue(FileManager.default.createFile(atPath: p, contents: Data(repeating: 0xAB, count: 64 << 20)))
            let old = Glibc.open(p, O_RDONLY)
            XCTAssertEqual(fsync(old), 0)
            close(old)

            let d = try await FileDevice.create(path: p, size: Int64(size), options: FileDevice.Options(engine: engine))
            var at = 0
            while at < size {
                try await d.write(chunk, at: Int64(at))
                at += chunk.count
            }
            try await d.close()

            let fd = Glibc.open(p, O_RDONLY)
            defer { close(fd) }
            var st = ferry_cache_state()
            XCTAssertEqual(ferry_cachestat(fd, &st), 0)
            // Without the fix, close starts write-back of all of it: nearly nothing is left dirty.
            XCTAssertGreaterThan(st.dirty, Int64(size / 2), "\(engine): \(st.dirty) of \(size) bytes still dirty after close, \(st.writeback) under write-back")
            unlink(p)
        }
    }
}
