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
    if !options.useExistingTarget {
        try Formats.validate(options: options.targetOptions.filter { $0.key != "size" }, for: targetFormat, path: target.location)
    }
    for s in sources where sameFile(s.location, target.location) {
        throw FerryError(.invalidArgument, "the target is the same file as the source '\(s.location)'", path: target.location)
    }

    var opened: [OpenedImage] = []
    func closeSources() async {
        for image in opened { try? await image.device.close() }
    }
    do {
        for s in sources {
            let image = try await Images.open(s, readOnly: true, options: options.sourceEndpoint)
            opened.append(image)
            if image.probedAsRaw {
                warning?("\(s.location): image format was not specified and probing guessed raw; pass -f raw to say so and silence this warning")
            }
            for w in image.warnings { warning?(w) }
        }
    } catch {
        await closeSources()
        throw error
    }
    let source: any BlockDevice = opened.count == 1 ? opened[0].device : ConcatDevice(opened.map(\.device))

    let out: OpenedImage
    var created = false
    do {
        if options.useExistingTarget {
            out = try await Images.open(ImageSpec(target.location, format: targetFormat.name), readOnly: false,
                                        options: options.targetEndpoint)
            if out.device.size < source.size {
                try? await out.device.close()
                throw FerryError(.tooSmall, "target is too small: \(out.device.size) bytes, but the source has \(source.size)", path: target.location)
            }
        } else {
            out = try await Images.create(target.location, format: targetFormat.name, size: source.size,
                                          options: options.targetOptions, endpoint: options.targetEndpoint)
            created = out.createdNewFile
        }
    } catch {
        await closeSources()
        throw error
    }

    var config = CopyConfiguration()
    config.workers = options.workers
    config.bufferSize = options.bufferSize
    config.outOfOrder = options.outOfOrder
    config.sparseSize = options.sparseSize
    config.targetReadsZero = options.useExistingTarget ? options.targetIsZero : out.device.capabilities.contains(.zeroInit)

    do {
        var stats = try await CopyEngine.copy(from: source, to: out.device, configuration: config, progress: progress)
        if options.targetCache.flushes {
            try await out.device.flush()
        }
        try await out.device.close()
        await closeSources()
        // The time the caller waited, flush included.
        stats.elapsed = Tracker.now() - started
        return stats
    } catch {
        try? await out.device.close()
        await closeSources()
        var e = (error as? FerryError) ?? FerryError(.io, "\(error)", path: target.location)
        if created {
            unlink(target.location)
            // The place first, then the note, so the sentence reads in order.
            if let offset = e.offset, !e.message.contains("offset") { e.message += " at offset \(offset)" }
            e.message += "; the incomplete target was removed"
        }
        throw e
    }
}

/// True if both paths name the same existing file (same device and inode).
func sameFile(_ a: String, _ b: String) -> Bool {
    var sa = stat(), sb = stat()
    guard stat(a, &sa) == 0, stat(b, &sb) == 0 else { return false }
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
}
