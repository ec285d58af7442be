import Foundation
import XCTest
import FerryTestServers

/// `ferry convert` into and out of a real one-node Ceph cluster (scripts/ceph-start.sh, started
/// once for the class), judged by `qemu-img compare` (which reads `rbd:` itself), `rbd du` and
/// `rbd info`; every error ends in one line naming the image and a non-zero exit.
final class RBDTests: ServerCLITestCase {
    override class var scratchName: String { "rbd" }

    override class func startServer() throws -> any ScriptServer {
        try CephCluster(name: "cli")
    }

    var cluster: CephCluster { shared() }
    var pool: String { CephCluster.pool }

    static let image = TestImage(name: "src.raw", size: (40 << 20) + 3072, writes: [
        "write -P 0xab 0 64k",
        "write -P 0x11 5M 3M",
        "write -P 0x22 9437696 3584",
        "write -P 0 12M 2M",
        "write -P 0x44 30M 66048",
        "write -P 0xcd 41943040 3072",
    ])

    /// Runs the rbd tool against the test cluster.
    @discardableResult
    func rbd(_ args: [String]) throws -> String {
        try Tools.must("rbd", ["-c", cluster.conf] + args, in: dir)
    }

    /// Images in the pool (or namespace).
    func images(namespace: String? = nil) throws -> [String] {
        try rbd(["ls", pool] + (namespace.map { ["--namespace", $0] } ?? [])).split(separator: "\n").map(String.init)
    }

    /// `rbd du`: bytes the image's objects use.
    func used(_ spec: String) throws -> Int64 {
        let json = try rbd(["du", "--format", "json", spec])
        let top = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        let list = top?["images"] as? [[String: Any]] ?? []
        return list.compactMap { number($0["used_size"]) }.reduce(0, +)
    }

    func number(_ value: Any?) -> Int64? { (value as? NSNumber)?.int64Value }

    func info(_ spec: String) throws -> [String: Any] {
        let json = try rbd(["info", "--format", "json", spec])
        return try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] ?? [:]
    }

    /// A fresh image name for each test, so tests never see each other's images.
    func name(_ base: String) -> String { "\(base)-\(UInt32.random(in: 0 ... .max))" }

    func testRawAndQcow2RoundTripsThroughTheCluster() throws {
        let src = try Self.image.build(in: dir)
        let qcow = path("src.qcow2")
        try Tools.must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", src, qcow], in: dir)
        for (i, extra) in [[], ["-m", "1"], ["-m", "16", "-W"]].enumerated() {
            // raw and qcow2 sources into a raw image in the cluster, and back out.
            for (source, format) in [(src, "raw"), (qcow, "qcow2")] {
                let img = name("rt\(i)-\(format)")
                try convert(extra + ["-f", format, "-O", "raw", source, cluster.url("\(pool)/\(img)")])
                try compare(source, cluster.url("\(pool)/\(img)"), formats: (format, "raw"))
                XCTAssertEqual(number(try info("\(pool)/\(img)")["size"]), Self.image.size)
                // The data touches 5 of the 11 objects of 4 MiB (the last one 3 KiB long); the
                // 2 MiB the source wrote as zeros and every hole stay without objects.
                XCTAssertLessThanOrEqual(try used("\(pool)/\(img)"), (16 << 20) + 3072, "zero runs are not written")
                let back = path("back\(i)-\(format).raw")
                try convert(extra + ["-f", "raw", "-O", "raw", cluster.url("\(pool)/\(img)"), back])
                try compare(src, back)
                XCTAssertLessThan(allocatedBytes(back), 20 << 20, "what the cluster holds no object for stays a hole")
                let backQcow = path("back\(i)-\(format).qcow2")
                try convert(extra + ["-f", "raw", "-O", "qcow2", cluster.url("\(pool)/\(img)"), backQcow])
                try compare(src, backQcow, formats: ("raw", "qcow2"))
                try rbd(["rm", "--no-progress", "\(pool)/\(img)"])
            }
        }
    }

    func testQcow2ImageStoredInTheCluster() throws {
        let src = try Self.image.build(in: dir)
        let img = name("q2")
        // cluster_size is qcow2's here: the image keeps the cluster's 4 MiB objects.
        try convert(["-f", "raw", "-O", "qcow2", "-o", "cluster_size=128k", src, cluster.url("\(pool)/\(img)")])
        try compare(src, cluster.url("\(pool)/\(img)"), formats: ("raw", "qcow2"))
        let check = try Tools.run(try Tools.require("qemu-img"), ["check", "-f", "qcow2", cluster.url("\(pool)/\(img)")], in: dir)
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
        let qinfo = try Tools.must("qemu-img", ["info", "-f", "qcow2", cluster.url("\(pool)/\(img)")], in: dir)
        XCTAssertTrue(qinfo.contains("cluster_size: 131072"), qinfo)
        XCTAssertEqual(number(try info("\(pool)/\(img)")["object_size"]), 4 << 20)
        let back = path("back.raw")
        try convert(["-O", "raw", cluster.url("\(pool)/\(img)"), back])
        try compare(src, back)
    }

    func testSnapshotIsAReadOnlySource() throws {
        let src = try Self.image.build(in: dir)
        let img = name("snap")
        try convert(["-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(img)")])
        try rbd(["snap", "create", "--no-progress", "\(pool)/\(img)@before"])
        // Change the image after the snapshot: the snapshot still reads as the source.
        let other = path("other.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", other, "\(Self.image.size)"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 8M", other], in: dir)
        try convert(["-n", "-f", "raw", "-O", "raw", other, cluster.url("\(pool)/\(img)")])
        let snap = path("snap.raw")
        try convert(["-f", "raw", "-O", "raw", cluster.url("\(pool)/\(img)@before"), snap])
        try compare(src, snap)
        try compare(other, cluster.url("\(pool)/\(img)"))
        let r = try failedConvert(["-n", "-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(img)@before")],
                                  url: cluster.url("\(pool)/\(img)@before"))
        XCTAssertTrue(r.stderr.contains("snapshot"), r.stderr)
        let missing = try failedConvert(["-f", "raw", "-O", "raw", cluster.url("\(pool)/\(img)@nope"), path("x.raw")],
                                        url: cluster.url("\(pool)/\(img)@nope"))
        XCTAssertTrue(missing.stderr.contains("snapshot 'nope'"), missing.stderr)
    }

    func testNamespacesAndCreateOptions() throws {
        let src = try Self.image.build(in: dir)
        try rbd(["namespace", "create", "\(pool)/ns1"])
        let img = name("opts")
        try convert(["-f", "raw", "-O", "raw", "-o", "object_size=1M,features=layering+exclusive-lock+object-map+fast-diff",
                     src, cluster.url("\(pool)/ns1/\(img)")])
        XCTAssertEqual(try images(namespace: "ns1"), [img])
        XCTAssertFalse(try images().contains(img), "the image is in the namespace, not the pool's default one")
        let i = try info("\(pool)/ns1/\(img)")
        XCTAssertEqual(number(i["object_size"]), 1 << 20)
        XCTAssertEqual(Set(i["features"] as? [String] ?? []), ["layering", "exclusive-lock", "object-map", "fast-diff"])
        try compare(src, cluster.url("\(pool)/ns1/\(img)"))
        // 1 MiB objects: fewer bytes for the same data than 4 MiB ones.
        XCTAssertLessThanOrEqual(try used("\(pool)/ns1/\(img)"), 8 << 20)

        let striped = name("striped")
        try convert(["-f", "raw", "-O", "raw", "-o", "cluster_size=64k,stripe_unit=16k,stripe_count=4,features=layering+striping",
                     src, cluster.url("\(pool)/\(striped)")])
        let s = try info("\(pool)/\(striped)")
        XCTAssertEqual(number(s["object_size"]), 64 << 10)
        XCTAssertEqual(number(s["stripe_unit"]), 16 << 10)
        XCTAssertEqual(number(s["stripe_count"]), 4)
        try compare(src, cluster.url("\(pool)/\(striped)"))

        // Bad values are refused before anything is made.
        for (opt, says) in [("object_size=3M", "power of two"), ("features=warp-drive", "unknown feature"),
                            ("stripe_unit=16k", "go together")] {
            let bad = name("bad")
            let r = try failedConvert(["-f", "raw", "-O", "raw", "-o", opt, src, cluster.url("\(pool)/\(bad)")], url: cluster.url("\(pool)/\(bad)"))
            XCTAssertTrue(r.stderr.contains(says), r.stderr)
            XCTAssertFalse(try images().contains(bad))
        }
    }

    func testWritingIntoAnExistingImage() throws {
        let src = try Self.image.build(in: dir)
        let big = name("big")
        try rbd(["create", "--size", "64M", "\(pool)/\(big)"])
        // Without -n an existing image is not overwritten.
        let r = try failedConvert(["-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(big)")], url: cluster.url("\(pool)/\(big)"))
        XCTAssertTrue(r.stderr.contains("exists already"), r.stderr)
        XCTAssertTrue(try images().contains(big), "the existing image is left alone")
        try convert(["-n", "-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(big)")])
        // The first 40 MiB are the source's; ferry compare without -s allows the zero tail.
        let cmp = try Tools.ferry(["compare", "-f", "raw", "-F", "raw", src, cluster.url("\(pool)/\(big)")], in: dir)
        XCTAssertEqual(cmp.status, 0, cmp.stdout + cmp.stderr)
        let small = name("small")
        try rbd(["create", "--size", "8M", "\(pool)/\(small)"])
        let t = try failedConvert(["-n", "-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(small)")], url: cluster.url("\(pool)/\(small)"))
        XCTAssertTrue(t.stderr.contains("too small"), t.stderr)
        XCTAssertEqual(try used("\(pool)/\(small)"), 0, "nothing was written into the image that is too small")
    }

    func testErrorsNameTheImageAndLeaveNothingBehind() throws {
        let src = try Self.image.build(in: dir)
        // No cluster at the address: the timeout ends the wait.
        let nowhere = "rbd:\(pool)/x:mon_host=127.0.0.1\\:1:conf=\(cluster.conf)"
        let a = try failedConvert(["--timeout", "2", "-f", "raw", "-O", "raw", nowhere, path("a.raw")], url: nowhere)
        XCTAssertTrue(a.stderr.contains("could not connect"), a.stderr)
        XCTAssertFalse(fileExists(path("a.raw")))
        // Bad credentials: a client the cluster does not know.
        let stranger = "rbd:\(pool)/x:conf=\(cluster.conf):id=stranger"
        let b = try failedConvert(["-f", "raw", "-O", "raw", src, stranger], url: stranger)
        XCTAssertTrue(b.stderr.contains("permission denied"), b.stderr)
        // A missing pool, a missing image.
        let noPool = cluster.url("nopool/x")
        let c = try failedConvert(["-f", "raw", "-O", "raw", src, noPool], url: noPool)
        XCTAssertTrue(c.stderr.contains("no pool 'nopool'"), c.stderr)
        let noImage = cluster.url("\(pool)/\(name("absent"))")
        let d = try failedConvert(["-f", "raw", "-O", "raw", noImage, path("d.raw")], url: noImage)
        XCTAssertTrue(d.stderr.contains("there is no image"), d.stderr)
        // A malformed location.
        let e = try failedConvert(["-f", "raw", "-O", "raw", src, "rbd:\(pool)"], url: "rbd:\(pool)")
        XCTAssertTrue(e.stderr.contains("expected rbd:POOL"), e.stderr)
    }

    func testAFullPoolFailsAtOnce() throws {
        let src = try Self.image.build(in: dir)
        let ceph = { (args: [String]) throws -> String in try Tools.must("ceph", ["-c", self.cluster.conf] + args, in: self.dir) }
        let quota = name("quota")
        _ = try ceph(["osd", "pool", "create", quota, "8", "8"])
        _ = try ceph(["osd", "pool", "application", "enable", quota, "rbd"])
        try rbd(["pool", "init", quota])
        try rbd(["create", "--size", "64M", "\(quota)/existing"])
        // A quota of one byte, which the pool's own RBD metadata exceeds: the monitors mark
        // the pool full once the OSD's statistics reach them.
        _ = try ceph(["osd", "pool", "set-quota", quota, "max_bytes", "1"])
        let deadline = Date().addingTimeInterval(90)
        while !(try ceph(["osd", "pool", "ls", "detail"])).split(separator: "\n").contains(where: { $0.contains("'\(quota)'") && $0.contains("full_quota") }),
              Date() < deadline {
            usleep(500_000)
        }
        let new = cluster.url("\(quota)/new")
        let started = Date()
        let a = try failedConvert(["-f", "raw", "-O", "raw", src, new], url: new)
        XCTAssertTrue(a.stderr.contains("over its quota"), a.stderr)
        XCTAssertFalse(try rbd(["ls", quota]).contains("new"), "no image is left in the full pool")
        let existing = cluster.url("\(quota)/existing")
        let b = try failedConvert(["-n", "-f", "raw", "-O", "raw", src, existing], url: existing)
        XCTAssertTrue(b.stderr.contains("over its quota") && b.stderr.contains("at offset"), b.stderr)
        XCTAssertLessThan(Date().timeIntervalSince(started), 20, "a full pool fails the copy at once, not after the timeout")
        _ = try ceph(["osd", "pool", "delete", quota, quota, "--yes-i-really-really-mean-it"])
    }

    func testOptionHelpListsWhatTheStorageTakes() throws {
        let raw = try Tools.ferry(["convert", "-O", "raw", "-o", "help", "src", cluster.url("\(pool)/x")], in: dir)
        XCTAssertEqual(raw.status, 0, raw.stderr)
        let storage = raw.stdout.components(separatedBy: "Supported options of the target's storage:").last ?? ""
        for name in ["object_size", "cluster_size", "features", "stripe_unit", "stripe_count", "data_pool"] {
            XCTAssertTrue(storage.contains("  \(name) "), "\(name) in: \(raw.stdout)")
        }
        // With -O qcow2, cluster_size is qcow2's: listed once, among the format's options.
        let qcow = try Tools.ferry(["create", "-f", "qcow2", "-o", "help", cluster.url("\(pool)/x")], in: dir)
        let parts = qcow.stdout.components(separatedBy: "Supported options of the target's storage:")
        XCTAssertEqual(parts.count, 2, qcow.stdout)
        XCTAssertTrue(parts[0].contains("  cluster_size "), qcow.stdout)
        XCTAssertFalse(parts[1].contains("cluster_size"), qcow.stdout)
        // A local target has no storage options.
        let local = try Tools.ferry(["convert", "-O", "raw", "-o", "help", "src", "dst"], in: dir)
        XCTAssertFalse(local.stdout.contains("storage"), local.stdout)
    }

    func testAFailedCopyRemovesTheImageItCreated() throws {
        // A qcow2 source cut short: its last data cluster lies past the end of the file, so
        // the copy fails after writing the first clusters into the new image.
        let qcow = path("cut.qcow2")
        try Tools.must("qemu-img", ["create", "-q", "-f", "qcow2", qcow, "64M"], in: dir)
        try Tools.must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x31 0 8M", "-c", "write -P 0x32 60M 4M", qcow], in: dir)
        let size = fileSize(qcow)
        XCTAssertEqual(truncate(qcow, off_t(size - (2 << 20))), 0)
        let img = name("failed")
        let r = try Tools.ferry(["convert", "-f", "qcow2", "-O", "raw", qcow, cluster.url("\(pool)/\(img)")], in: dir)
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.contains("past the end of the file") && r.stderr.contains("the incomplete target was removed"), r.stderr)
        XCTAssertFalse(try images().contains(img), "the image the failed copy made is gone")
    }

    func testATerabyteSparseImageCopiesInSeconds() throws {
        let sparse = path("tera.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", sparse, "1T"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 700G 2M",
                                   "-c", "write -P 0x3c 1023G 4M", sparse], in: dir)
        let img = name("tera")
        try convert(["-f", "raw", "-O", "raw", sparse, cluster.url("\(pool)/\(img)")])
        XCTAssertLessThanOrEqual(try used("\(pool)/\(img)"), 16 << 20)
        let back = path("tera-back.qcow2")
        // Out again: only the objects that exist are read (the object map says which).
        let r = try Tools.ferry(["convert", "--progress=json", "-f", "raw", "-O", "qcow2", cluster.url("\(pool)/\(img)"), back], in: dir, timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        let last = r.stdout.split(separator: "\n").last.map { Data($0.utf8) } ?? Data()
        let progress = try JSONSerialization.jsonObject(with: last) as? [String: Any] ?? [:]
        XCTAssertEqual(progress["final"] as? Bool, true, r.stdout)
        XCTAssertLessThanOrEqual(number(progress["read"]) ?? .max, 16 << 20, "whole objects of data read, not the terabyte")
        try compare(sparse, back, formats: ("raw", "qcow2"))
        XCTAssertLessThan(fileSize(back), 64 << 20)
        try rbd(["rm", "--no-progress", "\(pool)/\(img)"])
    }

    func testYAnOSDKilledAndRestartedMidCopyIsRiddenOut() throws {
        // Named to run late: the cluster loses its OSD for a while.
        let src = path("data.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", src, "512M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x3d 0 256M", "-c", "write -P 0x4e 384M 128M", src], in: dir)
        let img = name("restarted")
        guard let osd = cluster.osdPid else { return XCTFail("no OSD pid") }
        let copy = try Tools.start(try Tools.require("ferry"), ["convert", "--progress=json", "-m", "1", "-f", "raw", "-O", "raw",
                                                                src, cluster.url("\(pool)/\(img)")], in: dir)
        let deadline = Date().addingTimeInterval(20)
        while !copy.stdoutSoFar.contains("\"done\":") && Date() < deadline { usleep(20_000) }
        XCTAssertEqual(kill(osd, SIGKILL), 0)
        usleep(500_000)
        XCTAssertTrue(cluster.startOSD(), "the OSD starts again")
        // librados sends what was in flight again once the OSD is back: the copy completes.
        let r = try copy.wait(timeout: 120)
        XCTAssertEqual(r.status, 0, r.stderr)
        try compare(src, cluster.url("\(pool)/\(img)"))
        try rbd(["rm", "--no-progress", "\(pool)/\(img)"])
    }

    func testZStoppedOSDFailsTheCopyWithinTheTimeout() throws {
        // Named to run last: the cluster is stopped for a while.
        let src = path("data.raw")
        try Tools.must("qemu-img", ["create", "-q", "-f", "raw", src, "512M"], in: dir)
        try Tools.must("qemu-io", ["-f", "raw", "-c", "write -P 0x6b 0 512M", src], in: dir)
        let img = name("stalled")
        try rbd(["create", "--size", "512M", "\(pool)/\(img)"])
        guard let osd = cluster.osdPid else { return XCTFail("no OSD pid") }
        defer { kill(osd, SIGCONT) }
        // One request at a time, so the copy is still under way when the OSD stops.
        let copy = try Tools.start(try Tools.require("ferry"), ["convert", "--progress=json", "--timeout", "3", "-m", "1", "-n",
                                                                "-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(img)")], in: dir)
        let deadline = Date().addingTimeInterval(20)
        while !copy.stdoutSoFar.contains("\"done\":") && Date() < deadline { usleep(20_000) }
        XCTAssertEqual(kill(osd, SIGSTOP), 0)
        let stopped = Date()
        let r = try copy.wait(timeout: 60)
        XCTAssertNotEqual(r.status, 0, "the copy into a stopped OSD did not fail")
        XCTAssertLessThan(Date().timeIntervalSince(stopped), 30, "the timeout bounds the wait")
        let lines = r.stderr.split(separator: "\n").filter { !$0.isEmpty }
        XCTAssertEqual(lines.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains(cluster.url("\(pool)/\(img)")) && r.stderr.contains("did not answer in time"), r.stderr)
        XCTAssertTrue(r.stderr.contains("at offset") || r.stderr.contains("flush"), "the message says where: \(r.stderr)")
        let last = r.stdout.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(last.contains("\"error\":"), "the last progress line reports the failure: \(last)")
        kill(osd, SIGCONT)
        // The cluster serves again once the OSD runs, and the copy then completes.
        try convert(["-n", "-f", "raw", "-O", "raw", src, cluster.url("\(pool)/\(img)")])
        try compare(src, cluster.url("\(pool)/\(img)"))
        // Not removed: the failed copy's watch on the image lasts until the OSD times it out.
    }
}
