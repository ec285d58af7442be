import XCTest
import FerryCore
@testable import FerryRBD

/// qemu's `rbd:` names, parsed without a cluster.
final class RBDLocationTests: XCTestCase {
    func testPoolImageSnapshotNamespaceAndKeys() throws {
        let a = try RBDLocation(parsing: "rbd:pool/img")
        XCTAssertEqual(a.pool, "pool")
        XCTAssertEqual(a.image, "img")
        XCTAssertNil(a.namespace)
        XCTAssertNil(a.snapshot)
        XCTAssertNil(a.conf)
        XCTAssertTrue(a.settings.isEmpty)

        let b = try RBDLocation(parsing: "rbd:pool/ns/img@snap1:conf=/etc/ceph/x.conf:id=glance:keyring=/k:mon_host=10.0.0.1\\:6789")
        XCTAssertEqual(b.pool, "pool")
        XCTAssertEqual(b.namespace, "ns")
        XCTAssertEqual(b.image, "img")
        XCTAssertEqual(b.snapshot, "snap1")
        XCTAssertEqual(b.conf, "/etc/ceph/x.conf")
        XCTAssertEqual(b.id, "glance")
        XCTAssertEqual(b.settings.map(\.key), ["keyring", "mon_host"])
        XCTAssertEqual(b.settings.map(\.value), ["/k", "10.0.0.1:6789"])
        XCTAssertEqual(b.spec, "pool/ns/img@snap1")
    }

    func testEscapesAndValuesWithEquals() throws {
        let a = try RBDLocation(parsing: "rbd:p/we\\:ird\\@name\\/x:key=AQB+abc==:auth_supported=cephx;none")
        XCTAssertEqual(a.image, "we:ird@name/x")
        XCTAssertNil(a.snapshot)
        XCTAssertEqual(a.settings.map(\.key), ["key", "auth_client_required"])
        XCTAssertEqual(a.settings.map(\.value), ["AQB+abc==", "cephx,none"])
    }

    func testMalformedNamesAreRefused() {
        for bad in ["rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:a/b/c/d", "rbd:pool/img@", "rbd:pool/img@a@b",
                    "rbd:pool//img", "rbd:pool/img:novalue", "rbd:pool/img:=x", "rbd:pool/img\\"] {
            XCTAssertThrowsError(try RBDLocation(parsing: bad), bad) { e in
                XCTAssertEqual((e as? FerryError)?.code, .invalidArgument, bad)
                XCTAssertEqual((e as? FerryError)?.path, bad)
            }
        }
    }

    func testCreateOptions() throws {
        let o = try RBDCreateOptions(["object_size": "1M", "features": "layering,exclusive-lock", "stripe_unit": "64k",
                                      "stripe_count": "4", "data_pool": "ec"], path: "rbd:p/i")
        XCTAssertEqual(o.order, 20)
        XCTAssertEqual(o.features, 1 | 4)
        XCTAssertEqual(o.stripeUnit, 65536)
        XCTAssertEqual(o.stripeCount, 4)
        XCTAssertEqual(o.dataPool, "ec")
        XCTAssertEqual(try RBDCreateOptions(["cluster_size": "64k", "features": "61"], path: "x").order, 16)
        XCTAssertEqual(try RBDCreateOptions(["features": "61"], path: "x").features, 61)
        XCTAssertNil(try RBDCreateOptions([:], path: "x").order)
        for bad: [String: String] in [["object_size": "3M"], ["object_size": "2k"], ["object_size": "64M"],
                                      ["object_size": "1M", "cluster_size": "1M"], ["features": "warp"],
                                      ["stripe_unit": "64k"], ["stripe_count": "0", "stripe_unit": "4k"], ["data_pool": ""]] {
            XCTAssertThrowsError(try RBDCreateOptions(bad, path: "rbd:p/i"), "\(bad)")
        }
    }
}
