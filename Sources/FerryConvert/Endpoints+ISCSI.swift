import FerryCore
import FerryISCSI

// iscsi:// URLs: a LUN on an iSCSI target through libiscsi (FerryISCSI).
extension Images {
    /// iSCSI sessions to open: the endpoint option (`--connections`, default 4).
    static func iscsiConnections(_ options: EndpointOptions) -> Int {
        max(1, options.connections)
    }

    static func openISCSI(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        try await ISCSIDevice.open(location, readOnly: readOnly, connections: iscsiConnections(options))
    }

    /// A LUN is never created or resized: it is opened for writing, and one smaller than
    /// `size` is a `.tooSmall` error before anything is written.
    static func createISCSI(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        try await ISCSIDevice.openTarget(location, size: size, connections: iscsiConnections(options))
    }
}
