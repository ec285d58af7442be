import Foundation
import XCTest
import FerryTestServers

/// A base class that starts one target for the whole class and stops it at the end, whatever
/// happened. Tests fail (not skip) when the target cannot start: CI must notice.
class ISCSITestCase: XCTestCase {
    nonisolated(unsafe) static var shared: ISCSITarget?
    nonisolated(unsafe) static var startError: String?

    override class func setUp() {
        super.setUp()
        do { shared = try ISCSITarget(name: "device", port: 3281, control: 81) } catch { startError = "\(error)" }
    }

    override class func tearDown() {
        shared?.stop()
        shared = nil
        super.tearDown()
    }

    var target: ISCSITarget!

    override func setUpWithError() throws {
        guard let t = Self.shared else {
            XCTFail("tgtd did not start: \(Self.startError ?? "?")")
            throw XCTSkip("no iSCSI target")
        }
        target = t
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
    func fillPattern(seed: UInt8) {
        for i in 0 ..< bytes.count { bytes[i] = UInt8(truncatingIfNeeded: i &* 31 &+ i >> 12 &+ Int(seed)) }
    }
}
