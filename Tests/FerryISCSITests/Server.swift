import Foundation
import XCTest
// Re-exported so every file of this target sees TestBuffer and the servers.
@_exported import FerryTestServers

/// A base class that starts one target for the whole class and stops it at the end, whatever
/// happened (see `SharedServerTestCase`).
class ISCSITestCase: SharedServerTestCase {
    override class func startServer() throws -> any ScriptServer {
        try ISCSITarget(name: "device", port: 3281, control: 81)
    }

    var target: ISCSITarget { shared() }
}
