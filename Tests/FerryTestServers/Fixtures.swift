import Foundation
// A release build compiles this target too, where XCTest is not there: the fixtures exist
// only for the tests.
#if canImport(XCTest)
import XCTest
#endif

// What the test targets of the network endpoints share besides the servers themselves: a
// server started once for a whole test class, the buffers tests read into, and sparse files.

/// A server started by the project's scripts (`NFSServer`, `ISCSITarget`).
public protocol ScriptServer: AnyObject {
    /// Stops the server (idempotent) and removes its files.
    func stop()
}

/// A test class whose tests share one server: started by the class's `setUp` (through
/// `startServer`, which a subclass overrides), stopped by its `tearDown` whatever happened in
/// between. A test fails (not skips) when it could not start: CI must notice. Each subclass
/// gets a server of its own, one class after the other.
#if canImport(XCTest)
open class SharedServerTestCase: XCTestCase {
    // XCTest runs a class's setUp, its tests and its tearDown on one thread, one class after
    // the other: nothing else touches `servers`.
    nonisolated(unsafe) private static var servers: [ObjectIdentifier: Result<any ScriptServer, any Error>] = [:]

    /// The server of this class; called once, from the class's `setUp`.
    open class func startServer() throws -> any ScriptServer {
        throw XCTSkip("\(self) names no server")
    }

    override open class func setUp() {
        super.setUp()
        servers[ObjectIdentifier(self)] = Result { try startServer() }
    }

    override open class func tearDown() {
        if case .success(let s)? = servers.removeValue(forKey: ObjectIdentifier(self)) { s.stop() }
        super.tearDown()
    }

    /// Fails (and skips) the test when the class's server did not start.
    override open func setUpWithError() throws {
        try super.setUpWithError()
        let what = "the server of \(type(of: self))"
        switch Self.servers[ObjectIdentifier(type(of: self))] {
        case .success?:
            return
        case .failure(let e)?:
            XCTFail("\(what) did not start: \(e)")
        case nil:
            XCTFail("\(what) did not start: ?")
        }
        throw XCTSkip("no \(what)")
    }

    /// The class's server (which `setUpWithError` found started), as what it is.
    public func shared<Server: ScriptServer>(_ type: Server.Type = Server.self) -> Server {
        guard case .success(let s as Server)? = Self.servers[ObjectIdentifier(Swift.type(of: self))] else {
            preconditionFailure("\(Swift.type(of: self)) has no \(Server.self) started")
        }
        return s
    }
}
#endif

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
