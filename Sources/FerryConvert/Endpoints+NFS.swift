import FerryCore

// nfs:// URLs (libnfs). To be replaced by the NFS endpoint.
extension Images {
    static func openNFS(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "nfs:// URLs are not supported yet", path: location)
    }

    static func createNFS(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "nfs:// URLs are not supported yet", path: location)
    }
}
