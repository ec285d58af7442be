import Foundation
import XCTest
// Re-exported so every file of this target sees TestBuffer and the servers.
@_exported import FerryTestServers

/// A base class that starts one server for the whole class and stops it at the end, whatever
/// happened (see `SharedServerTestCase`).
class NFSTestCase: SharedServerTestCase {
    class var serverName: String { "device" }
    class var ports: (Int, Int) { (2061, 20061) }

    override class func startServer() throws -> any ScriptServer {
        try NFSServer(name: serverName, nfsPort: ports.0, mountPort: ports.1)
    }

    var server: NFSServer { shared() }

    /// A file of `size` bytes (sparse) at `path` with `byte` written at each (offset, length).
    @discardableResult
    func makeFile(_ path: String, size: Int64, data: [(Int64, Int, UInt8)] = []) throws -> String {
        try makeSparseFile(path, size: size, data: data)
    }
}
