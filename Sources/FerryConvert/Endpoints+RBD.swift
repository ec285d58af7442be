import FerryCore
import FerryFormats
import FerryRBD

// rbd:POOL/IMAGE locations: an image in a Ceph cluster through librbd (FerryRBD).
extension Images {
    /// librbd's write-back cache serves the cache modes that go through a cache; `none` and
    /// `directsync` turn it off, as qemu does.
    static func rbdCache(_ options: EndpointOptions) -> Bool { !options.cache.direct }

    static func openRBD(_ location: String, readOnly: Bool, options: EndpointOptions) async throws -> any BlockDevice {
        try await RBDDevice.open(location, readOnly: readOnly, cache: rbdCache(options), resilience: options.resilience)
    }

    /// A new image of `size` bytes, made with the `-o` options meant for RBD.
    static func createRBD(_ location: String, size: Int64, options: EndpointOptions) async throws -> any BlockDevice {
        let made = try RBDCreateOptions(options.storage, path: location)
        return try await RBDDevice.create(location, size: size, options: made, cache: rbdCache(options), resilience: options.resilience)
    }

    /// The `-o` names the storage at `location` takes for a new image (RBD's object size and
    /// features), with their help; none for files and exports.
    public static func storageOptions(for location: String) -> [(name: String, help: String)] {
        RBDDevice.handles(location) ? RBDCreateOptions.names : []
    }

    /// Parts `-o` options into those of the format and those of the storage: a name the
    /// format takes is the format's (qcow2's `cluster_size` on RBD is qcow2's), one it does not
    /// but the storage does is the storage's. Names neither takes stay with the format, whose
    /// check then names them.
    public static func splitCreateOptions(_ options: [String: String], format: any ImageFormat.Type,
                                          location: String) -> (format: [String: String], storage: [String: String]) {
        let storageNames = Set(storageOptions(for: location).map(\.name))
        guard !storageNames.isEmpty else { return (options, [:]) }
        let formatNames = Set(format.createOptions.map(\.name))
        var mine: [String: String] = [:]
        var storage: [String: String] = [:]
        for (key, value) in options {
            if !formatNames.contains(key) && storageNames.contains(key) { storage[key] = value } else { mine[key] = value }
        }
        return (mine, storage)
    }

    /// Checks `-o` options for a new image in `format` at `location`, the format's and the
    /// storage's, and returns them parted (`splitCreateOptions`).
    @discardableResult
    public static func validateCreateOptions(_ options: [String: String], format: any ImageFormat.Type,
                                             location: String) throws -> (format: [String: String], storage: [String: String]) {
        let (mine, storage) = splitCreateOptions(options, format: format, location: location)
        try Formats.validate(options: mine, for: format, path: location)
        if !storage.isEmpty { _ = try RBDCreateOptions(storage, path: location) }
        return (mine, storage)
    }
}
