import FerryCore
import FerryNFS

// nfs:// URLs: a file on an NFS server through libnfs (FerryNFS).
extension Images {
    /// NFS sessions to open. One by default: measured here, a second session adds nothing to
    /// the throughput of one ganesha on two cores (the requests in flight of `-m` already keep
    /// one session busy), while it costs a second mount. `--connections N` asks for N.
    static func nfsConnections(_ options: EndpointOptions) -> Int {
        max(1, options.connections)
    }

    static func openNFS(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        try await NFSDevice.open(location, readOnly: readOnly, connections: nfsConnections(options))
    }

    static func createNFS(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        try await NFSDevice.create(location, size: size, connections: nfsConnections(options))
    }
}
