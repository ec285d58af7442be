import FerryCore
import FerryNFS

// nfs:// URLs: a file on an NFS server through libnfs (FerryNFS).
extension Images {
    /// NFS sessions to open: the endpoint option (`--connections`, default 4). Measured with
    /// bench/nfs.sh (1 GiB, ganesha on loopback, 2 CPUs): 4 sessions copy NFS -> local in
    /// 2.36 s against 2.98 s with one (1.65 s against 2.55 s with `-t unsafe`), since each
    /// session's event loop copies its replies on its own thread and ganesha serves the
    /// sessions in parallel. Sessions to one file are coherent once COMMITted, and flush
    /// commits on every one of them.
    static func nfsConnections(_ options: EndpointOptions) -> Int {
        max(1, options.sessions)
    }

    static func openNFS(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        try await NFSDevice.open(location, readOnly: readOnly, connections: nfsConnections(options), resilience: options.resilience)
    }

    static func createNFS(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        try await NFSDevice.create(location, size: size, connections: nfsConnections(options), resilience: options.resilience)
    }
}
