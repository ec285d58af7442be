import Foundation
import XCTest
// Re-exported so every file of this target sees TestBuffer and the servers.
@_exported import FerryTestServers

/// A base class that starts one target for the whole class and stops it at the end, whatever
/// happened (see `ClassServer`).
class ISCSITestCase: XCTestCase {
    static let fixture = ClassServer<ISCSITarget>("tgtd")

    override class func setUp() {
        super.setUp()
        fixture.start { try ISCSITarget(name: "device", port: 3281, control: 81) }
    }

    override class func tearDown() {
        fixture.stop()
        super.tearDown()
    }

    var target: ISCSITarget!

    override func setUpWithError() throws {
        target = try Self.fixture.require()
    }
}
