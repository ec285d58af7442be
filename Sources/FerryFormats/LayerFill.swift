import FerryCore

/// Data to be written into clusters an image's own layer leaves to its backing file (a safe
/// `rebase`: what the old backing file held there and the new one does not).
public struct LayerFill: Sendable {
    public var location: String
    /// The image's file, opened for writing.
    public var file: any BlockDevice
    /// Guest offsets of whole clusters (of the image's cluster size), ascending, each
    /// unallocated in the image's own layer.
    public var clusters: [Int64]
    /// Fills the buffer with the data of the cluster at the guest offset.
    public var read: @Sendable (_ offset: Int64, _ into: UnsafeMutableRawBufferPointer) async throws -> Void
    /// As `ResizeRequest.setFileLength`.
    public var setFileLength: @Sendable (_ length: Int64) async throws -> any BlockDevice

    public init(location: String, file: any BlockDevice, clusters: [Int64],
                read: @escaping @Sendable (_ offset: Int64, _ into: UnsafeMutableRawBufferPointer) async throws -> Void,
                setFileLength: @escaping @Sendable (_ length: Int64) async throws -> any BlockDevice) {
        self.location = location
        self.file = file
        self.clusters = clusters
        self.read = read
        self.setFileLength = setFileLength
    }
}

extension ImageFormat {
    /// By default a format cannot take data into its layer in place.
    public static func fillLayer(_ fill: LayerFill) async throws {
        throw FerryError(.notSupported, "format '\(name)' cannot be rebased safely (only with -u)", path: fill.location)
    }
}
