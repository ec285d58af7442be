import FerryCore
import FerryISCSI

// iscsi:// URLs: a LUN on an iSCSI target through libiscsi (FerryISCSI).
extension Images {
    /// iSCSI sessions to open: the endpoint option (`--connections`), by default 4 to write and
    /// one to read. NFS -> iSCSI at +1 ms each way took 0.91 of the time with four sessions
    /// than with one; an iSCSI -> NFS qcow2 backup took 0.91 of the time with one reading
    /// session than with four (0.95 at 0 ms). 1 GiB, tgtd and ganesha on loopback behind
    /// ferry-delay-proxy, on 2 CPUs that every extra session's wake-ups share.
    static func iscsiConnections(_ options: EndpointOptions, reading: Bool) -> Int {
        max(1, options.connections ?? (reading ? 1 : EndpointOptions.defaultConnections))
    }

    static func openISCSI(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        try await ISCSIDevice.open(location, readOnly: readOnly, connections: iscsiConnections(options, reading: readOnly),
                                   resilience: options.resilience)
    }

    /// A LUN is never created or resized: it is opened for writing, and one smaller than
    /// `size` is a `.tooSmall` error before anything is written.
    static func createISCSI(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        try await ISCSIDevice.openTarget(location, size: size, connections: iscsiConnections(options, reading: false),
                                         resilience: options.resilience)
    }
}
