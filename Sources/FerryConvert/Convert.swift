import FerryCore
import FerryFile
import FerryFormats

#if canImport(Glibc)
import Glibc
#endif

/// Converts `sources` (copied back to back) into `target`.
///
/// Creates the target (unless `options.useExistingTarget`), copies with `options.workers`
/// requests in flight, flushes the target unless its cache mode is `unsafe`, and closes
/// everything. `progress` is called now and then from any thread with the counters so far;
/// `warning` receives one-line warnings (a format probed as raw).
///
/// On failure or cancellation the error names the image and offset, and a target this call
/// created is removed, so a failed copy never looks like a finished one.
public func convert(
    sources: [ImageSpec],
    target: ImageSpec,
    options: ConvertOptions,
    progress: (@Sendable (CopyStats) -> Void)? = nil,
    warning: (@Sendable (String) -> Void)? = nil
) async throws -> CopyStats {
    let started = Tracker.now()
    try options.validate()
    guard !sources.isEmpty else { throw FerryError(.invalidArgument, "no source image given") }
    let targetFormat = try Formats.lookup(target.format ?? options.targetFormat, for: target.location, writing: true)
    var targetOptions = options.targetOptions
    if options.compress {
        try Formats.require(.compression, of: targetFormat, options: targetOptions, for: "-c (compression)", path: target.location)
    }
    if let b = options.backingFile {
        try Formats.require(.backingFile, of: targetFormat, options: targetOptions, for: "-B (a backing file)", path: target.location)
        if let o = targetOptions["backing_file"], o != b {
            throw FerryError(.invalidArgument, "-B '\(b)' contradicts -o backing_file=\(o)", path: target.location)
        }
        targetOptions["backing_file"] = b
        if let f = options.backingFormat { targetOptions["backing_fmt"] = f }
    }
    if !options.useExistingTarget {
        try Images.validateCreateOptions(targetOptions, format: targetFormat, location: target.location)
    }
    if options.bitmaps && !targetFormat.features(options: targetOptions).contains(.persistentBitmaps) {
        throw FerryError(.notSupported, "Format driver '\(targetFormat.name)' does not support bitmaps (\(Formats.able(.persistentBitmaps)) can store them)",
                         path: target.location)
    }
    for s in sources where sameFile(s.location, target.location) {
        throw FerryError(.invalidArgument, "the target is the same file as the source '\(s.location)'", path: target.location)
    }

    // A target that exists needs nothing from the sources: it opens while they do (over the
    // network, each takes handshakes). A source's error still comes first.
    let existingTarget: Task<OpenedImage, any Error>? = options.useExistingTarget ? Task {
        try await Images.open(ImageSpec(target.location, format: targetFormat.name), readOnly: false,
                              options: options.targetEndpoint)
    } : nil
    var opened: [OpenedImage] = []
    do {
        for s in sources {
            let image = try await Images.open(s, readOnly: true, options: options.sourceEndpoint)
            opened.append(image)
            image.passWarnings(to: warning)
        }
    } catch {
        await closeImages(opened)
        await closeUnused(existingTarget)
        throw error
    }
    let source: any BlockDevice = opened.count == 1 ? opened[0].device : ConcatDevice(opened.map(\.device))
    var bitmaps: [PersistentBitmap] = []
    if options.bitmaps {
        do {
            bitmaps = try await copiedBitmaps(of: opened, sources: sources, options: options, warning: warning)
        } catch {
            await closeImages(opened)
            await closeUnused(existingTarget)
            throw error
        }
    }

    let out: OpenedImage
    var created = false
    do {
        if let existingTarget {
            out = try await existingTarget.value
            if out.device.size < source.size {
                try? await out.device.close()
                throw FerryError(.tooSmall, "target is too small: \(out.device.size) bytes, but the source has \(source.size)", path: target.location)
            }
        } else {
            out = try await Images.create(target.location, format: targetFormat.name, size: source.size,
                                          options: targetOptions, endpoint: options.targetEndpoint)
            created = out.createdNewFile || out.createdStorage
            for w in out.warnings { warning?(w) }
        }
    } catch {
        await closeImages(opened)
        throw error
    }

    var config = CopyConfiguration()
    config.workers = options.workers
    config.bufferSize = options.bufferSize
    config.requestWindow = options.requestWindow
    config.outOfOrder = options.outOfOrder
    config.maxInFlight = options.maxInFlight
    config.rateLimit = options.rateLimit
    config.salvage = options.salvage
    config.copyOffload = options.copyOffload
    if options.compress, let c = out.device as? ClusterCompressingDevice { c.enableCompression() }
    // A buffer holds at least one of the target's aligned blocks (a whole qcow2 cluster).
    let targetAlignment = out.device.limits.alignment
    if config.bufferSize < targetAlignment { config.bufferSize = targetAlignment }
    var copySource = source
    if let b = options.backingFile, opened.count == 1,
       let view = AboveBackingView(source, backing: resolveRelative(b, to: target.location)) {
        // The source is layered over the new backing file: copy only its layers above it.
        copySource = view
        config.skipUnallocated = true
    }
    config.sparseSize = options.sparseSize
    config.targetReadsZero = options.useExistingTarget ? options.targetIsZero : out.device.capabilities.contains(.zeroInit)

    // Sources inside an OVA are checked against its manifest while the copy runs.
    let digestCheck = MemberDigestCheck.start(for: opened)
    // Once nothing reads them, the sources close while the target is finished: closing a
    // network source takes round trips (an iSCSI logout, an NFS unmount), a flush longer.
    var sourcesClosing: Task<Void, Never>?
    do {
        if let algorithm = options.checksum { config.checksum = try BlockHasher(algorithm: algorithm, size: copySource.size) }
        var stats = try await CopyEngine.copy(from: copySource, to: out.device, configuration: config, progress: progress)
        stats.notes = try await digestCheck.finish()
        sourcesClosing = Task { [opened] in await closeImages(opened) }
        if let hasher = config.checksum {
            stats.checksum = try hasher.finish()
            stats.checksumAlgorithm = hasher.algorithm
        }
        if !bitmaps.isEmpty {
            guard let store = out.device as? PersistentBitmapStore else {
                throw FerryError(.notSupported, "the target cannot store persistent bitmaps", path: target.location)
            }
            try await store.store(bitmaps: bitmaps)
        }
        if options.useExistingTarget {
            if options.targetCache.flushes { try await out.device.flush() }
            try await out.device.close()
        } else {
            try await Images.finish(out, durable: options.targetCache.flushes)
        }
        await sourcesClosing?.value
        // The time the caller waited, flush included.
        stats.elapsed = Tracker.now() - started
        return stats
    } catch {
        await digestCheck.cancel()
        if created { out.markCreatedStorageForRemoval() }
        // Closing removes storage the copy made (an RBD image): that may fail too.
        var removal: (any Error)?
        do { try await out.device.close() } catch { if out.createdStorage { removal = error } }
        if let sourcesClosing { await sourcesClosing.value } else { await closeImages(opened) }
        var e = (error as? FerryError) ?? FerryError(.io, "\(error)", path: target.location)
        if created {
            out.removeCreatedFiles()
            // The place first, then the note, so the sentence reads in order.
            if let offset = e.offset, !e.message.contains("offset") { e.message += " at offset \(offset)" }
            if let removal {
                e.message += "; the incomplete target could not be removed (\((removal as? FerryError)?.message ?? "\(removal)"))"
            } else {
                e.message += "; the incomplete target was removed"
            }
        }
        throw e
    }
}

/// Closes the target `task` opened, if it did, for a conversion that ends before using it.
private func closeUnused(_ task: Task<OpenedImage, any Error>?) async {
    if let image = try? await task?.value { await closeImages([image]) }
}

/// Closes images a conversion opened and no longer reads; a failure to close changes nothing
/// for the copy.
private func closeImages(_ images: [OpenedImage]) async {
    for image in images { try? await image.device.close() }
}

/// The persistent bitmaps `--bitmaps` copies: every one of the single source's, read before
/// the target is created so that a bitmap that cannot be copied fails the conversion first.
/// One left in use is an error, or with `--skip-broken-bitmaps` a warning.
private func copiedBitmaps(of opened: [OpenedImage], sources: [ImageSpec], options: ConvertOptions,
                           warning: (@Sendable (String) -> Void)?) async throws -> [PersistentBitmap] {
    guard opened.count == 1, let device = opened[0].device as? PersistentBitmapSource else {
        throw FerryError(.notSupported, "Source lacks bitmap support", path: sources.count == 1 ? sources[0].location : nil)
    }
    var out: [PersistentBitmap] = []
    for b in try await device.persistentBitmaps() {
        guard b.inUse else {
            out.append(b)
            continue
        }
        guard options.skipBrokenBitmaps else {
            throw FerryError(.corrupt, "Cannot copy inconsistent bitmap '\(b.name)'; try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                             path: sources[0].location)
        }
        warning?("Skipping inconsistent bitmap '\(b.name)'")
    }
    return out
}

/// True if both paths name the same existing file (same device and inode).
func sameFile(_ a: String, _ b: String) -> Bool {
    var sa = stat(), sb = stat()
    guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
}

/// The layers of a source chain above a given backing file, seen as one device: reads are the
/// source's, extents are `.unallocated` only where no layer above the backing file has the
/// range (so a copy with `skipUnallocated` leaves it to the backing file).
final class AboveBackingView: BlockDevice, @unchecked Sendable {
    let source: any BlockDevice
    let layers: [any LayeredDevice]
    var name: String { source.name }
    var size: Int64 { source.size }
    var limits: BlockLimits { source.limits }
    var capabilities: BlockCapabilities { source.capabilities.union(.extents) }

    /// Nil unless `backing` (a path) is the file of an image in the source's backing chain.
    init?(_ source: any BlockDevice, backing: String) {
        guard let want = Images.fileIdentity(backing) else { return nil }
        var layers: [any LayeredDevice] = []
        var d: any BlockDevice = source
        while let l = d as? LayeredDevice, let next = l.backing {
            layers.append(l)
            let path = (l as? DescribedDevice)?.details.fullBackingFilename ?? next.name
            if Images.fileIdentity(path) == want {
                self.source = source
                self.layers = layers
                return
            }
            d = next
        }
        return nil
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try await source.read(at: offset, into: buffer)
    }
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "source is read-only", path: name)
    }
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "source is read-only", path: name)
    }
    func discard(at offset: Int64, length: Int64) async throws {}
    func flush() async throws {}
    func close() async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await cover(0, range.lowerBound ..< min(range.upperBound, size)).coalesced()
    }

    /// Extents of layers `k...` over all of `range`.
    private func cover(_ k: Int, _ range: Range<Int64>) async throws -> [Extent] {
        var out: [Extent] = []
        var pos = range.lowerBound
        let layer = layers[k]
        while pos < range.upperBound {
            if pos >= layer.size {
                // Past the end of this layer: reads as zeros from above.
                out.append(Extent(offset: pos, length: range.upperBound - pos, kind: .zero))
                break
            }
            let end = min(range.upperBound, layer.size)
            let batch = try await layer.layerExtents(in: pos ..< end)
            guard let first = batch.first, first.offset == pos, first.length > 0 else {
                throw FerryError(.corrupt, "extents at offset \(pos) do not start where asked", path: layer.name, offset: pos)
            }
            for var e in batch {
                guard e.offset == pos, e.length > 0 else { break }
                if e.end > end { e.length = end - e.offset }
                if e.kind == .unallocated && k + 1 < layers.count {
                    out += try await cover(k + 1, e.offset ..< e.end)
                } else {
                    out.append(e)
                }
                pos = e.end
                if pos >= end { break }
            }
        }
        return out
    }
}
