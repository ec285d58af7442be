import FerryCore
import FerryFile
import FerryFormats
#if canImport(Glibc)
import Glibc
#endif

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
    /// One-line warnings found while opening (a backing file whose format was guessed).
    public var warnings: [String] = []
    /// Further new local files `Images.create` made for the image (VMDK extents), removed
    /// with it when a copy fails.
    public var createdFiles: [String] = []
    /// A new local image is written as `NAME.ferry-partial` and renamed to its name by
    /// `Images.finish`: a copy killed half way (kill -9, a crash) never leaves a file under
    /// the target's name, and a target that existed stays as it was until the copy is done.
    public var partial: PartialFile?

    /// True if `Images.create` made the storage itself (a new RBD image), which closing the
    /// device after `markCreatedStorageForRemoval` removes.
    public var createdStorage: Bool { (file as? CreatedStorage)?.created ?? false }

    /// Has storage `Images.create` made removed when the device closes (a failed copy).
    public func markCreatedStorageForRemoval() {
        (file as? CreatedStorage)?.removeWhenClosed()
    }

    /// Removes the files `Images.create` made (after a failed copy).
    public func removeCreatedFiles() {
        if createdNewFile { unlink(partial?.path ?? location) }
        for path in createdFiles { unlink(path) }
    }
}

extension OpenedImage {
    /// Passes on what opening the image found worth a warning: a format only guessed, then
    /// the formats' own.
    public func passWarnings(to warning: (@Sendable (String) -> Void)?) {
        if probedAsRaw { warning?(Images.probedAsRawWarning(location)) }
        for w in warnings { warning?(w) }
    }
}

extension Images {
    /// The warning for an image whose format nothing recognised, so it is read as raw.
    public static func probedAsRawWarning(_ location: String) -> String {
        "\(location): image format was not specified and probing guessed raw; pass -f raw to say so and silence this warning"
    }
}

/// Where a new local image is written until it is complete, and what it becomes.
public struct PartialFile: Sendable {
    /// The temporary name, `NAME.ferry-partial` beside the target: in plain sight, so that
    /// what a killed copy leaves is seen (and reused by the next copy).
    public var path: String
    /// The file it is renamed onto (the target, or the file a symbolic link target names).
    public var final: String
    /// The mode and owner of a target that existed, given to the new file before it replaces it.
    public var existing: (mode: mode_t, uid: uid_t, gid: gid_t)?

    /// For a new local image at `location`; nil where the image is written in place (a block
    /// device, or something that is not a plain path).
    static func make(for location: String) -> PartialFile? {
        var final = location
        var st = stat()
        var existing: (mode_t, uid_t, gid_t)?
        if stat(location, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFREG else { return nil }
            existing = (st.st_mode & 0o7777, st.st_uid, st.st_gid)
            // Through a symbolic link: the file it names is replaced, the link stays.
            if let resolved = realpath(location, nil) {
                final = String(cString: resolved)
                free(resolved)
            }
        }
        return PartialFile(path: final + ".ferry-partial", final: final, existing: existing)
    }

    /// Gives the new file the old one's mode and owner, renames it onto the target, and (when
    /// `durable`) makes the rename itself durable by syncing the directory.
    func commit(durable: Bool, location: String) throws {
        if let (mode, uid, gid) = existing {
            _ = chown(path, uid, gid)
            _ = chmod(path, mode)
        }
        // The old file goes first: ext4 (auto_da_alloc) writes back a file renamed over
        // another at once, the 0.35 s per 512 MiB that writing through a second descriptor
        // saves; a rename onto a free name does not.
        if existing != nil { unlink(final) }
        guard rename(path, final) == 0 else {
            let err = errno
            unlink(path)
            throw FerryError.posix(err, "could not rename the finished image into place", path: location)
        }
        if durable {
            let slash = final.lastIndex(of: "/")
            let dir = slash.map { String(final[..<$0]) } ?? "."
            let fd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY)
            if fd >= 0 {
                _ = fsync(fd)
                close(fd)
            }
        }
    }
}

/// Paths of the extra files made while one image is created.
final class CreatedFiles: Sendable {
    private let paths = Locked<[String]>([])
    func add(_ path: String) { paths.withLock { $0.append(path) } }
    var all: [String] { paths.withLock { $0 } }
}

/// Warnings collected while a chain of images is opened.
final class WarningLog: Sendable {
    private let lines = Locked<[String]>([])
    func add(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [String] { lines.withLock { $0 } }
}

/// What `ferry info` shows; field names follow qemu-img's JSON.
public struct ImageInfo: Sendable, Equatable {
    public var filename: String
    public var format: String
    public var virtualSize: Int64
    public var actualSize: Int64?
    public var dirtyFlag: Bool
    /// What formats with more to say (qcow2) add: cluster size, backing file, snapshots,
    /// `format-specific`.
    public var details: ImageDetails? = nil
    /// With `--untrusted`: why the image is not self-contained (empty: it is), else nil.
    public var untrustedReasons: [String]? = nil
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
    /// The file `offset` is in (the image, a backing file, or an external data file).
    public var file: String? = nil
}

/// Opening, creating and describing images.
public enum Images {
    /// Backing chains deeper than this are refused (a loop, or an image built to exhaust us).
    public static let maxChainDepth = 64

    /// Opens an image. With no format in `spec`, probes it; a file nothing recognised is
    /// read as raw and `probedAsRaw` is set so the caller can warn. Warnings about the image's
    /// backing chain (a backing file whose format had to be guessed) are in `warnings`.
    public static func open(_ spec: ImageSpec, readOnly: Bool, options: EndpointOptions = EndpointOptions(),
                            depth: Int = 0) async throws -> OpenedImage {
        let warnings = WarningLog()
        var image = try await open(spec, readOnly: readOnly, options: options, depth: depth, chain: [], warnings: warnings,
                                   withBacking: true)
        image.warnings = warnings.all
        return image
    }

    static func open(_ spec: ImageSpec, readOnly: Bool, options: EndpointOptions, depth: Int,
                     chain: [String], warnings: WarningLog, withBacking: Bool) async throws -> OpenedImage {
        guard depth <= maxChainDepth else {
            throw FerryError(.corrupt, "backing chain is deeper than \(maxChainDepth) images (is it a loop?)", path: spec.location)
        }
        let identity = fileIdentity(spec.location)
        if let identity, chain.contains(identity) {
            throw FerryError(.corrupt, "backing chain loops back to '\(spec.location)', which is already in the chain", path: spec.location)
        }
        let chain = chain + (identity.map { [$0] } ?? [])
        let format: (any ImageFormat.Type)? = try spec.format.map { try Formats.lookup($0, for: spec.location) }
        if format == nil, await ArchiveLocation.isArchive(spec.location) {
            // Not to be read as a raw disk by accident: the user meant a disk inside it.
            throw await archiveGivenAsImage(spec.location)
        }
        let file = try await openEndpoint(spec.location, readOnly: readOnly, options: options)
        do {
            if options.untrusted { try await checkClaims(file, given: format, location: spec.location) }
            var probed = false
            var chosen = format
            if chosen == nil {
                chosen = try await probe(file)
                if chosen == nil { probed = true }
            }
            let f = chosen ?? Formats.fallback
            var context = FormatContext(location: spec.location, readOnly: readOnly, depth: depth, openBacking: { location, format, depth in
                if options.untrusted {
                    throw FerryError(.permissionDenied, "the image refers to the backing file '\(location)', which --untrusted does not follow", path: spec.location)
                }
                let backing = try await open(ImageSpec(location, format: format), readOnly: true, options: options, depth: depth,
                                             chain: chain, warnings: warnings, withBacking: true)
                if backing.probedAsRaw {
                    warnings.add("\(spec.location): the backing file '\(location)' has no format in the image header and probing guessed raw; set it with 'qemu-img rebase -u -F raw' to silence this warning")
                }
                return backing.device
            }, openFile: { location in
                if options.untrusted {
                    throw FerryError(.permissionDenied, "the image refers to the file '\(location)' (an extent or external data file), which --untrusted does not follow", path: spec.location)
                }
                return try await openEndpoint(location, readOnly: readOnly, options: options)
            }, warning: { warnings.add($0) })
            context.opensBacking = withBacking
            if let snapshot = spec.snapshot {
                guard f.hasInternalSnapshots else {
                    throw FerryError(.notSupported, "format \(f.name) does not support snapshots (formats that do: \(Formats.all.filter { $0.hasInternalSnapshots }.map { $0.name }.joined(separator: ", ")))", path: spec.location)
                }
                guard readOnly else { throw FerryError(.readOnly, "a snapshot can only be read", path: spec.location) }
                context.snapshot = snapshot
            }
            let device = try await f.open(file: file, context: context)
            return OpenedImage(device: device, file: file, format: f.name, location: spec.location, probedAsRaw: probed)
        } catch {
            try? await file.close()
            throw error
        }
    }

    /// What identifies a local file whatever the path used to reach it (device and inode),
    /// or nil for something that is not a local file.
    static func fileIdentity(_ location: String) -> String? {
        var st = stat()
        guard stat(location, &st) == 0 else { return nil }
        return "\(st.st_dev):\(st.st_ino)"
    }

    /// Creates a new image of `size` guest bytes in `format` at `location`.
    public static func create(_ location: String, format: String, size: Int64, options: [String: String],
                              endpoint: EndpointOptions = EndpointOptions()) async throws -> OpenedImage {
        try await create(location, format: format, size: Optional(size), options: options, endpoint: endpoint)
    }

    /// Creates a new image in `format` at `location`. An image of a format with backing files
    /// and a `backing_file` option gets that image (resolved against the new image's
    /// directory, as qemu does) as its backing file: it must exist, its format is probed when
    /// `backing_fmt` is not given, and its size is the new image's when `size` is nil.
    /// Everything is checked before the file is created.
    public static func create(_ location: String, format: String, size: Int64?, options: [String: String],
                              endpoint: EndpointOptions = EndpointOptions()) async throws -> OpenedImage {
        let f = try Formats.lookup(format, for: location)
        if let s = options["size"], ByteSize.parse(s) == nil {
            throw FerryError(.invalidArgument, "invalid size '\(s)'", path: location)
        }
        let (formatOptions, storageOptions) = try validateCreateOptions(options, format: f, location: location)
        var opts = formatOptions
        opts.removeValue(forKey: "size")
        let endpoint = { var e = endpoint; e.storage = storageOptions; return e }()
        var backing: OpenedImage?
        if let name = opts["backing_file"], !name.isEmpty {
            try Formats.require(.backingFile, of: f, options: opts, for: "a backing file", path: location)
            let full = resolveRelative(name, to: location)
            do {
                backing = try await open(ImageSpec(full, format: opts["backing_fmt"]), readOnly: true)
            } catch let e as FerryError {
                throw FerryError(e.code, "could not open the backing file '\(name)': \(e.message)", path: location)
            }
            if opts["backing_fmt"] == nil { opts["backing_fmt"] = backing!.format }
        }
        guard let size = size ?? backing?.device.size else {
            throw FerryError(.invalidArgument, "no size given for the new image (a size is needed unless there is a backing file)", path: location)
        }
        let fileSize: Int64
        let file: any BlockDevice
        var partial = urlScheme(location) == nil && ArchiveLocation.split(location) == nil ? PartialFile.make(for: location) : nil
        do {
            do { fileSize = try f.initialFileSize(for: size, options: opts) } catch let e as FerryError { throw e.at(path: location) }
            if let p = partial, let made = try? await FileDevice.create(path: p.path, size: fileSize, options: endpoint.fileOptions(readOnly: false), name: location) {
                file = made
            } else {
                // No temporary file here (a directory we may not write): in place, as before.
                partial = nil
                file = try await createEndpoint(location, size: fileSize, options: endpoint)
            }
        } catch {
            if let backing { try? await backing.device.close() }
            throw error
        }
        let isNewFile = (file as? FileDevice).map { !$0.isBlockDevice } ?? false
        let extra = CreatedFiles()
        let context = CreateContext(location: location, backing: backing?.device, backingFormat: opts["backing_fmt"],
                                    createFile: { path, size in
            // Only next to a new local file: an extent is never made on a device or export.
            guard isNewFile, urlScheme(path) == nil else {
                throw FerryError(.notSupported, "an image of several files can only be created as a local file", path: location)
            }
            let device = try await createEndpoint(path, size: size, options: endpoint)
            extra.add(path)
            return device
        })
        do {
            let device = try await f.create(file: file, size: size, options: opts, context: context)
            return OpenedImage(device: device, file: file, format: f.name, location: location, probedAsRaw: false,
                               createdNewFile: isNewFile, warnings: backing?.warnings ?? [], createdFiles: extra.all,
                               partial: isNewFile ? partial : nil)
        } catch let e as FerryError {
            (file as? CreatedStorage)?.removeWhenClosed()
            try? await file.close()
            if let backing { try? await backing.device.close() }
            if isNewFile { unlink(partial?.path ?? location) }
            for path in extra.all { unlink(path) }
            throw e.at(path: location)
        }
    }

    /// Finishes an image made by `create`: commits a format's metadata (a qcow2 header without
    /// the incomplete marker), flushes unless `durable` is false, closes it, and cuts a new
    /// local file to the size the format uses.
    public static func finish(_ image: OpenedImage, durable: Bool) async throws {
        if let c = image.device as? CommittingDevice {
            try await c.commit(durable: durable)
            if !image.createdNewFile, c.usedFileSize > 0, let t = image.file as? TruncatableDevice {
                try await t.truncateFile(to: c.usedFileSize)
            }
        } else if durable {
            try await image.device.flush()
        }
        try await image.device.close()
        let path = image.partial?.path ?? image.location
        if image.createdNewFile, let c = image.device as? CommittingDevice, c.usedFileSize > 0 {
            if truncate(path, off_t(c.usedFileSize)) != 0 {
                throw FerryError.posix(errno, "could not set the size of the new image", path: image.location)
            }
        }
        try image.partial?.commit(durable: durable, location: image.location)
    }

    /// Reads the first bytes of `file` and names the format, or nil if nothing is recognised.
    static func probe(_ file: any BlockDevice) async throws -> (any ImageFormat.Type)? {
        guard let header = try await firstBytes(file) else { return nil }
        if let f = try header.withUnsafeBytes({ try Formats.probe(header: $0, path: file.name) }) { return f }
        // Nothing at the start: a format known by its last bytes (dmg) is not read as raw.
        guard let trailer = try await lastBytes(file) else { return nil }
        return trailer.withUnsafeBytes { Formats.probe(trailer: $0) }
    }

    /// The first 4 KiB of `file` (fewer if it is shorter), nil if it is empty.
    static func firstBytes(_ file: any BlockDevice) async throws -> [UInt8]? {
        let n = Int(min(file.size, 4096))
        guard n > 0 else { return nil }
        let buffer = AlignedBuffer(count: 4096)
        // Whole aligned blocks, so O_DIRECT files can be probed too.
        let want = min(Int64(4096), (file.size + Int64(file.limits.alignment) - 1) / Int64(file.limits.alignment) * Int64(file.limits.alignment))
        try await file.read(at: 0, into: buffer.slice(0 ..< Int(min(want, file.size))))
        return Array(buffer.bytes[0 ..< n])
    }

    /// The last `Formats.trailerBytes` of `file`, nil if no format needs them or it is shorter.
    static func lastBytes(_ file: any BlockDevice) async throws -> [UInt8]? {
        let t = Int64(Formats.trailerBytes)
        guard t > 0, file.size >= t else { return nil }
        let a = Int64(file.limits.alignment)
        let from = (file.size - t) / a * a
        let tail = AlignedBuffer(count: Int((file.size - from + a - 1) / a * a))
        try await file.read(at: from, into: tail.slice(0 ..< Int(file.size - from)))
        let end = Int(file.size - from)
        return Array(tail.bytes[end - Int(t) ..< end])
    }

    /// `--untrusted`: a file that two formats claim, or that is given as one format while its
    /// bytes say another, is refused before any of it is parsed.
    static func checkClaims(_ file: any BlockDevice, given: (any ImageFormat.Type)?, location: String) async throws {
        guard let header = try await firstBytes(file) else { return }
        let trailer = try await lastBytes(file)
        var names = header.withUnsafeBytes { h in
            trailer.map { t in t.withUnsafeBytes { Formats.claimants(header: h, trailer: $0) } } ?? Formats.claimants(header: h, trailer: nil)
        }
        // An ISO 9660 volume (its descriptor at 32 KiB) that is also an image is the polyglot
        // OpenStack's format inspector looks for; a plain ISO is raw data.
        if file.size >= 36864 {
            let block = AlignedBuffer(count: 4096)
            try await file.read(at: 32768, into: block.slice(0 ..< 4096))
            if Array(block.bytes[1 ..< 6]) == Array("CD001".utf8) { names.append("iso9660") }
        }
        if names == ["iso9660"] { names = [] }
        if names.count > 1 {
            throw FerryError(.permissionDenied, "the file is a valid \(names.joined(separator: " and a valid ")) image at once (a polyglot); refused (--untrusted)", path: location)
        }
        if let given, let claimed = names.first, claimed != given.name {
            throw FerryError(.permissionDenied, "given as \(given.name), but its bytes are a \(claimed) image's; refused (--untrusted)", path: location)
        }
    }

    /// Opens `spec` read-only, runs `body`, and closes the image whatever happens. Without
    /// `withBacking` the image's backing chain is not opened (only described). One connection
    /// to a network server: what runs here (info, map, measure) asks one question at a time.
    public static func withImage<T>(_ spec: ImageSpec, withBacking: Bool = true, forceShare: Bool = false, untrusted: Bool = false,
                                    _ body: (OpenedImage) async throws -> T) async throws -> T {
        let warnings = WarningLog()
        let endpoint = EndpointOptions(connections: 1, forceShare: forceShare, untrusted: untrusted)
        var image = try await open(spec, readOnly: true, options: endpoint, depth: 0, chain: [], warnings: warnings,
                                   withBacking: withBacking)
        image.warnings = warnings.all
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

    /// `ferry info`: the image, and with `backingChain` every image under it, top first.
    public static func info(_ spec: ImageSpec, backingChain: Bool = false, forceShare: Bool = false, untrusted: Bool = false) async throws
        -> (chain: [ImageInfo], probedAsRaw: Bool, warnings: [String]) {
        // Like qemu-img, describing one image does not need its backing file to exist.
        try await withImage(spec, withBacking: backingChain, forceShare: forceShare, untrusted: untrusted) { image in
            var chain: [ImageInfo] = []
            var device: (any BlockDevice)? = image.device
            var filename = spec.location
            var format = image.format
            while let d = device {
                let described = d as? DescribedDevice
                chain.append(ImageInfo(
                    filename: filename,
                    format: format,
                    virtualSize: d.size,
                    // A disk inside an OVA takes what its member takes.
                    actualSize: (try? FileDevice.allocatedSize(path: filename))
                        ?? (chain.isEmpty ? (image.file as? SliceDevice)?.size : nil),
                    dirtyFlag: described?.details.dirty ?? false,
                    details: described?.details))
                // The image's other files (VMDK extents) count too, as qemu-img counts them.
                if let extra = described?.details.extraFiles, !extra.isEmpty, let own = chain[chain.count - 1].actualSize {
                    chain[chain.count - 1].actualSize = try? extra.reduce(own) { try $0 + FileDevice.allocatedSize(path: $1) }
                }
                guard backingChain, let layered = d as? LayeredDevice, let next = layered.backing else { break }
                filename = described?.details.fullBackingFilename ?? next.name
                format = (next as? DescribedDevice)?.formatName ?? Formats.fallback.name
                device = next
            }
            if untrusted {
                // What opening did not refuse but a gatekeeper must know: references named
                // (a backing file is described, not opened, here).
                var reasons: [String] = []
                if let b = chain[0].details?.backingFilename { reasons.append("names the backing file '\(b)'") }
                if let extra = chain[0].details?.extraFiles, !extra.isEmpty { reasons.append("refers to other files: \(extra.joined(separator: ", "))") }
                chain[0].untrustedReasons = reasons
            }
            return (chain, image.probedAsRaw, image.warnings)
        }
    }

    /// `ferry map`: the image's extents, joined into the fewest runs, with the depth in the
    /// backing chain each run comes from and where it lies in its file, as qemu-img map says.
    public static func map(_ spec: ImageSpec, forceShare: Bool = false, untrusted: Bool = false) async throws -> ([MapEntry], probedAsRaw: Bool) {
        try await withImage(spec, forceShare: forceShare, untrusted: untrusted) { image in
            (try await mapEntries(image.device, isRaw: image.format == Formats.fallback.name), image.probedAsRaw)
        }
    }

    /// `map`'s entries for an opened image.
    static func mapEntries(_ top: any BlockDevice, isRaw: Bool) async throws -> [MapEntry] {
        var entries: [MapEntry] = []
        var pos: Int64 = 0
        let cache = MappingCache()
        while pos < top.size {
            let e = try await mapStatus(top, isRaw: isRaw, at: pos, end: top.size, depth: 0, cache: cache)
            guard e.length > 0 else {
                throw FerryError(.corrupt, "no allocation status at offset \(pos)", path: top.name, offset: pos)
            }
            if var last = entries.last, last.depth == e.depth, last.data == e.data, last.zero == e.zero,
               last.present == e.present, last.start + last.length == e.start, last.file == e.file,
               (last.offset == nil && e.offset == nil)
                || (last.offset != nil && e.offset != nil && last.offset! + last.length == e.offset!) {
                last.length += e.length
                entries[entries.count - 1] = last
            } else {
                entries.append(e)
            }
            pos += e.length
        }
        return entries
    }

    /// The first run from `offset` of what a read of `device` returns and which layer it
    /// comes from: a layer's own runs, falling through to its backing image where it has none;
    /// past the end of a backing image (or with none) the run reads as zeros from `depth`.
    static func mapStatus(_ device: any BlockDevice, isRaw: Bool, at offset: Int64, end: Int64, depth: Int,
                          cache: MappingCache) async throws -> MapEntry {
        if let layer = device as? HostMappedDevice {
            guard var m = try await cache.mapping(layer, at: offset, end: end), m.offset <= offset, m.end > offset else {
                throw FerryError(.corrupt, "no allocation status at offset \(offset)", path: device.name, offset: offset)
            }
            m.hostOffset = m.hostOffset.map { $0 + (offset - m.offset) }
            let length = min(m.end, end) - offset
            let hostFile = m.hostOffset == nil ? nil : (m.hostFile ?? layer.hostFileName)
            switch m.kind {
            case .data:
                return MapEntry(start: offset, length: length, depth: depth, present: true, zero: m.readsAsZero, data: true,
                                offset: m.hostOffset, file: hostFile)
            case .zero:
                return MapEntry(start: offset, length: length, depth: depth, present: true, zero: true, data: false, offset: m.hostOffset,
                                file: hostFile)
            case .unallocated:
                guard let backing = layer.backing, offset < backing.size else {
                    return MapEntry(start: offset, length: length, depth: depth, present: false, zero: true, data: false, offset: m.hostOffset,
                                    file: hostFile)
                }
                let isRawBacking = !(backing is DescribedDevice)
                return try await mapStatus(backing, isRaw: isRawBacking, at: offset, end: min(offset + length, backing.size),
                                            depth: depth + 1, cache: cache)
            }
        }
        guard let e = try await cache.extent(device, at: offset, end: end), e.end > offset else {
            throw FerryError(.corrupt, "extents at offset \(offset) do not start where asked", path: device.name, offset: offset)
        }
        let length = min(e.end, end) - offset
        let data = e.kind == .data
        let present = e.kind != .unallocated || isRaw
        return MapEntry(start: offset, length: length, depth: depth, present: present, zero: !data, data: data,
                        offset: present ? offset : nil, file: present ? device.name : nil)
    }
}

/// The last batch of runs fetched from each layer during one `map`, so that walking a layer
/// run by run asks the layer once per batch rather than once per run.
final class MappingCache {
    private var batches: [ObjectIdentifier: [LayerMapping]] = [:]

    func mapping(_ layer: any HostMappedDevice, at offset: Int64, end: Int64) async throws -> LayerMapping? {
        let key = ObjectIdentifier(layer)
        if let batch = batches[key], let hit = Self.find(batch, offset) { return hit }
        let batch = try await layer.layerMapping(in: offset ..< end)
        batches[key] = batch
        return Self.find(batch, offset)
    }

    private var extentBatches: [ObjectIdentifier: [Extent]] = [:]

    /// The extent of `device` holding `offset` (a raw file or endpoint), from the last batch
    /// asked of it when it covers `offset`: walking a file extent by extent would otherwise
    /// ask again, for the whole rest of the file, at every extent.
    func extent(_ device: any BlockDevice, at offset: Int64, end: Int64) async throws -> Extent? {
        let key = ObjectIdentifier(device)
        if let batch = extentBatches[key], let hit = Self.find(batch, offset) { return hit }
        let batch = try await device.extents(in: offset ..< end)
        guard let first = batch.first, first.offset == offset else { return nil }
        extentBatches[key] = batch
        return Self.find(batch, offset)
    }

    /// The run of an ascending batch that holds `offset`, by binary search.
    private static func find<Run: OffsetRun>(_ batch: [Run], _ offset: Int64) -> Run? {
        var lo = 0, hi = batch.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if batch[mid].end <= offset { lo = mid + 1 } else { hi = mid }
        }
        guard lo < batch.count, batch[lo].offset <= offset else { return nil }
        return batch[lo]
    }
}

/// A run of a device, for `MappingCache.find`.
protocol OffsetRun {
    var offset: Int64 { get }
    var end: Int64 { get }
}
extension Extent: OffsetRun {}
extension LayerMapping: OffsetRun {}
