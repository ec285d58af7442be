import FerryCore
import FerryFile
import FerryFormats

/// An image opened for reading or writing: the guest-visible device and what it is.
public struct OpenedImage: Sendable {
    /// The guest-visible device (the format layer).
    public var device: any BlockDevice
    /// The host file or endpoint under the format layer.
    public var file: any BlockDevice
    public var format: String
    public var location: String
    /// True if the format was guessed as raw because nothing was recognised.
    public var probedAsRaw: Bool
    /// True if `Images.create` made a new local file (one that can be removed again).
    public var createdNewFile: Bool = false
}

/// What `ferry info` shows; field names follow qemu-img's JSON.
public struct ImageInfo: Sendable, Equatable {
    public var filename: String
    public var format: String
    public var virtualSize: Int64
    public var actualSize: Int64?
    public var dirtyFlag: Bool
}

/// One run of `ferry map`; field names follow qemu-img's JSON.
public struct MapEntry: Sendable, Equatable {
    public var start: Int64
    public var length: Int64
    public var depth: Int
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    /// Where the run lives in the host file, for runs that have one.
    public var offset: Int64?
}

/// Opening, creating and describing images.
public enum Images {
    /// Backing chains deeper than this are refused (a loop, or an image built to exhaust us).
    public static let maxChainDepth = 64

    /// Opens an image. With no format in `spec`, probes it; a file nothing recognises is
    /// read as raw and `probedAsRaw` is set so the caller can warn.
    public static func open(_ spec: ImageSpec, readOnly: Bool, options: EndpointOptions = EndpointOptions(),
                            depth: Int = 0) async throws -> OpenedImage {
        guard depth <= maxChainDepth else {
            throw FerryError(.corrupt, "backing chain is deeper than \(maxChainDepth) images (is it a loop?)", path: spec.location)
        }
        let format: (any ImageFormat.Type)? = try spec.format.map { try Formats.lookup($0, for: spec.location) }
        let file = try await openEndpoint(spec.location, readOnly: readOnly, options: options)
        do {
            var probed = false
            var chosen = format
            if chosen == nil {
                chosen = try await probe(file)
                if chosen == nil { probed = true }
            }
            let f = chosen ?? RawFormat.self
            let context = FormatContext(location: spec.location, readOnly: readOnly, depth: depth) { location, format, depth in
                try await open(ImageSpec(location, format: format), readOnly: true, options: options, depth: depth).device
            }
            let device = try await f.open(file: file, context: context)
            return OpenedImage(device: device, file: file, format: f.name, location: spec.location, probedAsRaw: probed)
        } catch {
            try? await file.close()
            throw error
        }
    }

    /// Creates a new image of `size` guest bytes in `format` at `location`.
    public static func create(_ location: String, format: String, size: Int64, options: [String: String],
                              endpoint: EndpointOptions = EndpointOptions()) async throws -> OpenedImage {
        let f = try Formats.lookup(format, for: location)
        var opts = options
        if let s = opts.removeValue(forKey: "size") {
            guard ByteSize.parse(s) != nil else {
                throw FerryError(.invalidArgument, "invalid size '\(s)'", path: location)
            }
        }
        try Formats.validate(options: options, for: f, path: location)
        let fileSize: Int64
        do { fileSize = try f.initialFileSize(for: size, options: opts) } catch let e as FerryError { throw e.at(path: location) }
        let file = try await createEndpoint(location, size: fileSize, options: endpoint)
        do {
            let device = try await f.create(file: file, size: size, options: opts)
            let isNewFile = (file as? FileDevice).map { !$0.isBlockDevice } ?? false
            return OpenedImage(device: device, file: file, format: f.name, location: location, probedAsRaw: false,
                               createdNewFile: isNewFile)
        } catch let e as FerryError {
            try? await file.close()
            throw e.at(path: location)
        }
    }

    /// Reads the first bytes of `file` and names the format, or nil if nothing is recognised.
    static func probe(_ file: any BlockDevice) async throws -> (any ImageFormat.Type)? {
        let n = Int(min(file.size, 4096))
        guard n > 0 else { return nil }
        let buffer = AlignedBuffer(count: 4096)
        // Whole aligned blocks, so O_DIRECT files can be probed too.
        let want = min(Int64(4096), (file.size + Int64(file.limits.alignment) - 1) / Int64(file.limits.alignment) * Int64(file.limits.alignment))
        try await file.read(at: 0, into: buffer.slice(0 ..< Int(min(want, file.size))))
        return try Formats.probe(header: UnsafeRawBufferPointer(rebasing: buffer.bytes[0 ..< n]), path: file.name)
    }

    /// Opens `spec` read-only, runs `body`, and closes the image whatever happens.
    public static func withImage<T>(_ spec: ImageSpec, _ body: (OpenedImage) async throws -> T) async throws -> T {
        let image = try await open(spec, readOnly: true)
        let result: T
        do {
            result = try await body(image)
        } catch {
            try? await image.device.close()
            throw error
        }
        try await image.device.close()
        return result
    }

    /// `ferry info`.
    public static func info(_ spec: ImageSpec) async throws -> (ImageInfo, probedAsRaw: Bool) {
        try await withImage(spec) { image in
            let info = ImageInfo(
                filename: spec.location,
                format: image.format,
                virtualSize: image.device.size,
                actualSize: try? FileDevice.allocatedSize(path: spec.location),
                dirtyFlag: false)
            return (info, image.probedAsRaw)
        }
    }

    /// `ferry map`: the image's extents, joined into the fewest runs.
    public static func map(_ spec: ImageSpec) async throws -> ([MapEntry], probedAsRaw: Bool) {
        try await withImage(spec) { image in
            var entries: [MapEntry] = []
            try await image.device.forEachExtent(in: 0 ..< image.device.size) { e in
                let data = e.kind == .data
                let zero = e.kind != .data
                let present = e.kind != .unallocated || image.format == RawFormat.name
                if var last = entries.last, last.data == data, last.zero == zero, last.present == present,
                   last.start + last.length == e.offset {
                    last.length += e.length
                    entries[entries.count - 1] = last
                } else {
                    entries.append(MapEntry(start: e.offset, length: e.length, depth: 0, present: present,
                                            zero: zero, data: data, offset: present ? e.offset : nil))
                }
            }
            return (entries, image.probedAsRaw)
        }
    }
}
