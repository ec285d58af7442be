import Foundation
import XCTest
import FerryTestServers

/// A base class that starts one server for the whole class and stops it at the end, whatever
/// happened. Tests fail (not skip) when the server cannot start: CI must notice.
class NFSTestCase: XCTestCase {
    nonisolated(unsafe) static var shared: NFSServer?
    nonisolated(unsafe) static var startError: String?
    class var serverName: String { "device" }
    class var ports: (Int, Int) { (2061, 20061) }

    override class func setUp() {
        super.setUp()
        do {
            shared = try NFSServer(name: serverName, nfsPort: ports.0, mountPort: ports.1)
        } catch {
            startError = "\(error)"
        }
    }

    override class func tearDown() {
        shared?.stop()
        shared = nil
        super.tearDown()
    }

    var server: NFSServer!

    override func setUpWithError() throws {
        guard let s = Self.shared else {
            XCTFail("the NFS server did not start: \(Self.startError ?? "?")")
            throw XCTSkip("no NFS server")
        }
        server = s
    }

    /// A file of `size` bytes (sparse) in `dir` with `byte` written at each (offset, length).
    @discardableResult
    func makeFile(_ path: String, size: Int64, data: [(Int64, Int, UInt8)] = []) throws -> String {
        let fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0o644)
        guard fd >= 0 else { throw POSIXError(.EIO) }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else { throw POSIXError(.EIO) }
        for (offset, length, byte) in data {
            let bytes = [UInt8](repeating: byte, count: length)
            guard pwrite(fd, bytes, length, off_t(offset)) == length else { throw POSIXError(.EIO) }
        }
        return path
    }
}

/// A buffer the test owns.
final class TestBuffer: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer
    init(count: Int, fill: UInt8 = 0) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: fill)
    }
    deinit { bytes.deallocate() }
    var all: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }
    func slice(_ offset: Int, _ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: bytes[offset ..< offset + count])
    }
    /// A pattern that differs at every offset, so misplaced pieces show.
    func fillPattern(seed: UInt8) {
        for i in 0 ..< bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12 &+ Int(seed)) }
    }
}
