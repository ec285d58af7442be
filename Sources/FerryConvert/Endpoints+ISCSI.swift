import FerryCore

// iscsi:// URLs (libiscsi). To be replaced by the iSCSI endpoint.
extension Images {
    static func openISCSI(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "iscsi:// URLs are not supported yet", path: location)
    }

    static func createISCSI(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "iscsi:// URLs are not supported yet", path: location)
    }
}
