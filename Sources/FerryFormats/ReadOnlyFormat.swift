import FerryCore

/// A format Ferry reads but never writes (Parallels, cloop): `-O` with it is refused by
/// `Formats.lookup(_:writing:)` before anything is created, so `create` is never reached.
protocol ReadOnlyImageFormat: ImageFormat {}

extension ReadOnlyImageFormat {
    public static var writable: Bool { false }
    public static var createOptions: [(name: String, help: String)] { [] }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        throw FerryError(.notSupported, "format '\(name)' cannot be written")
    }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "format '\(name)' cannot be written", path: context.location)
    }
}

/// The read-only answer of a read-only format's device to a write.
func readOnlyFormatError(_ format: String, _ name: String, _ offset: Int64) -> FerryError {
    FerryError(.readOnly, "\(format) images are read-only in ferry", path: name, offset: offset)
}
