import CFerryRBD
import CLibRBD
import FerryCore

#if canImport(Glibc)
import Glibc
#endif

/// A connection to a Ceph cluster (a librados handle) and an I/O context on one pool (and
/// namespace). Every call here may block (it talks to the monitors and OSDs), so each runs on
/// a thread of its own, never on the cooperative pool.
final class RBDCluster: @unchecked Sendable {
    let cluster: rados_t
    let io: rados_ioctx_t
    let location: RBDLocation
    let name: String

    private init(cluster: rados_t, io: rados_ioctx_t, location: RBDLocation, name: String) {
        self.cluster = cluster
        self.io = io
        self.location = location
        self.name = name
    }

    /// Connects as the location says. `timeout` (seconds, 0: Ceph's defaults) bounds the wait
    /// for the monitors and every later request to a monitor or an OSD: a cluster that is not
    /// there, or an OSD that stopped, fails the call instead of hanging it.
    static func connect(_ location: RBDLocation, name: String, timeout: Double, cache: Bool) async throws -> RBDCluster {
        if let why = ferry_rbd_load_error() {
            throw FerryError(.notSupported, String(cString: why), path: name)
        }
        return try await blocking {
            var handle: rados_t?
            var r = rados_create(&handle, location.id ?? "admin")
            guard r == 0, let cluster = handle else {
                throw FerryError.posix(-r, "could not make a Ceph client handle", path: name)
            }
            func fail(_ r: Int32, _ what: String) -> FerryError {
                rados_shutdown(cluster)
                return RBDCluster.error(r, what, name: name)
            }
            r = rados_conf_read_file(cluster, location.conf)
            if r < 0 && location.conf != nil {
                throw fail(r, "could not read the Ceph configuration '\(location.conf!)'")
            }
            var settings = location.settings
            if timeout > 0 {
                let t = String(Int(timeout.rounded(.up)))
                settings.insert(contentsOf: [("client_mount_timeout", t), ("rados_mon_op_timeout", t), ("rados_osd_op_timeout", t)], at: 0)
            }
            // librbd's write-back cache, as qemu sets it for its cache modes.
            settings.insert(("rbd_cache", cache ? "true" : "false"), at: 0)
            for (key, value) in settings {
                r = rados_conf_set(cluster, key, value)
                if r < 0 { throw fail(r, "could not set the Ceph option \(key)=\(value)") }
            }
            r = rados_connect(cluster)
            if r < 0 { throw fail(r, "could not connect to the Ceph cluster") }
            var ioctx: rados_ioctx_t?
            r = rados_ioctx_create(cluster, location.pool, &ioctx)
            guard r == 0, let io = ioctx else {
                if r == -ENOENT {
                    rados_shutdown(cluster)
                    throw FerryError(.notFound, "there is no pool '\(location.pool)'", path: name, errno: ENOENT)
                }
                throw fail(r, "could not open the pool '\(location.pool)'")
            }
            if let ns = location.namespace { rados_ioctx_set_namespace(io, ns) }
            // A full pool or cluster fails a write with ENOSPC/EDQUOT instead of holding it
            // until space appears, which would hang the copy until the timeout.
            rados_set_pool_full_try(io)
            return RBDCluster(cluster: cluster, io: io, location: location, name: name)
        }
    }

    /// Closes the pool and the connection.
    func shutdown() async {
        try? await blocking { [self] in
            rados_ioctx_destroy(io)
            rados_shutdown(cluster)
        }
    }

    /// A one-line error for a negative errno from librados or librbd.
    static func error(_ r: Int32, _ what: String, name: String, offset: Int64? = nil) -> FerryError {
        let e = -r
        var message = what
        switch e {
        case ETIMEDOUT: message += ": the cluster did not answer in time"
        case EACCES, EPERM: message += ": permission denied (check the client id and keyring)"
        case ENOENT: message += ": not found"
        case ENOSPC: message += ": the cluster is full"
        case EDQUOT: message += ": the pool is over its quota"
        default: message += ": \(String(cString: strerror(e)))"
        }
        return FerryError(e == ETIMEDOUT ? .io : FerryError.Code(errno: e), message, path: name, offset: offset, errno: e)
    }
}

/// Runs `body` on a thread of its own and waits for it: for librados and librbd calls that
/// block (connecting, opening, creating, iterating the allocation map).
func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
        let started = startDetachedThread(name: "ferry-rbd") {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
        if !started {
            continuation.resume(throwing: FerryError(.other, "could not start a thread for a Ceph call"))
        }
    }
}
