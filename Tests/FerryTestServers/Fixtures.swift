import Foundation
import XCTest

// What the test targets of the network endpoints share besides the servers themselves: a
// server started once for a whole test class, the buffers tests read into, and sparse files.

/// A server started by the project's scripts (`NFSServer`, `ISCSITarget`).
public protocol ScriptServer: AnyObject {
    /// Stops the server (idempotent) and removes its files.
    func stop()
}

/// The server of one test class: started by the class's `setUp`, stopped by its `tearDown`
/// whatever happened in between. A test fails (not skips) when it could not start: CI must
/// notice. Subclasses of a test class run one after the other, each with a server of its own.
public final class ClassServer<Server: ScriptServer>: @unchecked Sendable {
    // @unchecked: XCTest runs a class's setUp, its tests and its tearDown on one thread, one
    // after the other; nothing else touches `started`.
    private var started: Result<Server, any Error>?
    /// What the server is called in a failure: "the NFS server", "tgtd".
    private let what: String

    public init(_ what: String) { self.what = what }

    /// From the class's `setUp`.
    public func start(_ make: () throws -> Server) {
        started = Result { try make() }
    }

    /// From the class's `tearDown`.
    public func stop() {
        if case .success(let s)? = started { s.stop() }
        started = nil
    }

    /// From a test's `setUpWithError`: the server, or a failed and skipped test.
    public func require(file: StaticString = #filePath, line: UInt = #line) throws -> Server {
        switch started {
        case .success(let s)?:
            return s
        case .failure(let e)?:
            XCTFail("\(what) did not start: \(e)", file: file, line: line)
        case nil:
            XCTFail("\(what) did not start: ?", file: file, line: line)
        }
        throw XCTSkip("no \(what)")
    }
}

/// A buffer the test owns (4 KiB aligned, as O_DIRECT and iSCSI blocks want).
public final class TestBuffer: @unchecked Sendable {
    // @unchecked: the tests hand its bytes to one call at a time.
    public let bytes: UnsafeMutableRawBufferPointer

    public init(count: Int, fill: UInt8 = 0) {
        bytes = .allocate(byteCount: count, alignment: 4096)
        bytes.initializeMemory(as: UInt8.self, repeating: fill)
    }

    deinit { bytes.deallocate() }

    public var all: UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes) }

    public func allEqual(_ b: UInt8) -> Bool { bytes.allSatisfy { $0 == b } }

    public func slice(_ offset: Int, _ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: bytes[offset ..< offset + count])
    }

    /// A pattern that differs at every offset, so misplaced pieces show.
    public func fillPattern(seed: UInt8) {
        for i in 0 ..< bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12 &+ Int(seed)) }
    }
}

/// Makes `path` a file of `size` bytes (sparse) with `byte` written at each (offset, length).
@discardableResult
public func makeSparseFile(_ path: String, size: Int64, data: [(Int64, Int, UInt8)] = []) throws -> String {
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
