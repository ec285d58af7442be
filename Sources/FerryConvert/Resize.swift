import FerryCore
import FerryFile
import FerryFormats
#if canImport(Glibc)
import Glibc
#endif

extension Images {
    /// The guest size of an image, its format's name, and whether that was guessed as raw.
    public static func describeSize(_ spec: ImageSpec) async throws -> (size: Int64, format: String, probedAsRaw: Bool) {
        try await withImage(spec, withBacking: false) { ($0.device.size, $0.format, $0.probedAsRaw) }
    }

    /// The file of the image at `spec` opened for writing, and its format (named, or probed:
    /// raw if nothing is recognised), for commands that change an image in place.
    static func openForChange(_ spec: ImageSpec) async throws -> (any BlockDevice, any ImageFormat.Type) {
        let format: (any ImageFormat.Type)? = try spec.format.map { try Formats.lookup($0, for: spec.location) }
        let file = try await openEndpoint(spec.location, readOnly: false)
        do {
            var f = format
            if f == nil { f = try await probe(file) }
            return (file, f ?? Formats.fallback)
        } catch {
            try? await file.close()
            throw error
        }
    }

    /// Sets the length of the file `old` (opened for writing at `location`), closes it and
    /// returns it opened again: a local file by path, an endpoint that can cut its file.
    static func reopenAtLength(_ location: String, _ old: any BlockDevice, _ length: Int64) async throws -> any BlockDevice {
        if let t = old as? TruncatableDevice {
            try await t.truncateFile(to: length)
            try await old.close()
        } else if let fd = old as? FileDevice, !fd.isBlockDevice {
            try await old.close()
            if truncate(location, off_t(length)) != 0 {
                throw FerryError.posix(errno, "could not set the size of the image file", path: location)
            }
        } else {
            throw FerryError(.notSupported, "the size of \(location) cannot be changed (not a local file)", path: location)
        }
        return try await openEndpoint(location, readOnly: false)
    }

    /// `ferry resize`: changes the guest size of the image at `spec` to `size`, in place, as
    /// its format allows (`ImageFormat.resize`); `preallocation` is for the added part. The
    /// caller has checked that a shrink was asked for.
    public static func resize(_ spec: ImageSpec, to size: Int64, preallocation: String) async throws {
        guard size > 0 else { throw FerryError(.invalidArgument, "New image size must be positive") }
        let location = spec.location
        let (first, chosen) = try await openForChange(spec)
        let current = Locked<any BlockDevice>(first)
        do {
            let request = ResizeRequest(location: location, file: first, size: size, preallocation: preallocation) { length in
                let reopened = try await reopenAtLength(location, current.withLock { $0 }, length)
                current.withLock { $0 = reopened }
                return reopened
            }
            try await chosen.resize(request)
        } catch {
            try? await current.withLock { $0 }.close()
            throw error
        }
        try await current.withLock { $0 }.close()
    }
}
