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
    static func openForChange(_ spec: ImageSpec, readOnly: Bool = false) async throws -> (any BlockDevice, any ImageFormat.Type) {
        let format: (any ImageFormat.Type)? = try spec.format.map { try Formats.lookup($0, for: spec.location) }
        let file = try await openEndpoint(spec.location, readOnly: readOnly)
        do {
            var f = format
            if f == nil { f = try await probe(file) }
            return (file, f ?? Formats.fallback)
        } catch {
            try? await file.close()
            throw error
        }
    }

    /// Runs `body` with the file of the image at `spec` opened for writing (`openForChange`),
    /// its format, and a way to set the file's length (which opens the file again, so `body`
    /// asks `file.current` for it after); closes whichever file is current at the end.
    static func changeInPlace<T>(_ spec: ImageSpec, readOnly: Bool = false,
                                 _ body: (_ file: FileInPlace, _ format: any ImageFormat.Type) async throws -> T) async throws -> T {
        let (first, format) = try await openForChange(spec, readOnly: readOnly)
        let file = FileInPlace(location: spec.location, file: first)
        let result: T
        do {
            result = try await body(file, format)
        } catch {
            try? await file.current.close()
            throw error
        }
        try await file.current.close()
        return result
    }

    /// An image's file being changed in place, opened again whenever its length is set.
    final class FileInPlace: Sendable {
        let location: String
        private let file: Locked<any BlockDevice>
        init(location: String, file: any BlockDevice) {
            self.location = location
            self.file = Locked(file)
        }
        var current: any BlockDevice { file.withLock { $0 } }
        /// For the formats' `setFileLength`.
        var setLength: @Sendable (Int64) async throws -> any BlockDevice {
            { [self] length in
                let reopened = try await reopenAtLength(location, current, length)
                file.withLock { $0 = reopened }
                return reopened
            }
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
        try await changeInPlace(spec) { file, format in
            try await format.resize(ResizeRequest(location: spec.location, file: file.current, size: size,
                                                  preallocation: preallocation, setFileLength: file.setLength))
        }
    }
}
