import FerryCore

/// A format Ferry reads but never writes (Parallels, cloop, Bochs): `-O` with it is refused
/// by `Formats.lookup(_:writing:)` before anything is created, so `create` is never reached.
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

    /// The first `count` bytes of the image, after checking it is opened read-only and the
    /// file holds them.
    static func readHeader(_ file: any BlockDevice, count: Int, context: FormatContext) async throws -> [UInt8] {
        guard context.readOnly else {
            throw FerryError(.notSupported, "\(name) images can only be read by ferry", path: context.location)
        }
        guard file.size >= Int64(count) else {
            throw FerryError(.corrupt, "\(name) header is truncated: the file has \(file.size) of its \(count) bytes",
                             path: context.location, offset: 0)
        }
        return try await vhdxReadBytes(file, at: 0, count: count)
    }
}

/// The device of a read-only image in one file, with no backing image: writes are refused,
/// closing closes the file. qemu-img 7.2 shows neither a cluster size nor a dirty flag for
/// these formats (`undescribed`).
protocol ReadOnlyFileDevice: HostMappedDevice, DescribedDevice {
    var file: any BlockDevice { get }
}

extension ReadOnlyFileDevice {
    var backing: (any BlockDevice)? { nil }
    var limits: BlockLimits { BlockLimits() }
    var hostFileName: String { file.name }

    static var undescribed: ImageDetails {
        var d = ImageDetails()
        d.dirtyKnown = false
        return d
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "\(formatName) images are read-only in ferry", path: name, offset: offset)
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "\(formatName) images are read-only in ferry", path: name, offset: offset)
    }

    func discard(at offset: Int64, length: Int64) async throws {}
    func flush() async throws {}
    func close() async throws { try await file.close() }

    /// With no backing image, the layer's extents are the image's.
    func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await layerExtents(in: range)
    }

    /// As qemu-img 7.2 maps an image whose driver tells no allocation (cloop, bochs): one data
    /// run with no place in the file, so human `map` stops with an error, as there.
    func unplacedMapping(in range: Range<Int64>) throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return [LayerMapping(offset: range.lowerBound, length: size - range.lowerBound, kind: .data, hostOffset: nil)]
    }
}

/// A run of a read-only image: guest bytes stored plainly at `host` in its file, or a hole
/// (never written: zeros).
struct HostRun: MappedRun {
    var offset: Int64
    var length: Int64
    var host: Int64?
    var end: Int64 { offset + length }
    func joins(_ next: HostRun) -> Bool { (host == nil) == (next.host == nil) }
}

/// A read-only image whose guest bytes are plain runs of its file and holes (Parallels,
/// Bochs): reads and extents follow `runs`.
protocol HostRunDevice: ReadOnlyFileDevice {
    /// The runs from `range.lowerBound` (at most about `maxRuns`), ascending, contiguous,
    /// joined where they continue each other in the guest and the file.
    func runs(in range: Range<Int64>, maxRuns: Int) async throws -> [HostRun]
}

extension HostRunDevice {
    /// Holes read as zeros without touching the file.
    var capabilities: BlockCapabilities { [.extents, .cheapZeroReads] }

    /// Walks `range` (clipped to the device) one unit of `unit` bytes at a time, at most
    /// until `out` holds about `maxRuns` runs: `body` gets the unit's index, the part of the
    /// range in it, and where the unit starts, and appends that part's runs.
    func walk(_ range: Range<Int64>, unit: Int64, maxRuns: Int,
              _ body: (_ index: Int, _ part: Range<Int64>, _ unitStart: Int64, _ out: inout [HostRun]) async throws -> Void)
        async rethrows -> [HostRun] {
        var out: [HostRun] = []
        var pos = range.lowerBound
        while pos < min(range.upperBound, size) && out.count < maxRuns {
            let index = pos / unit
            let next = min((index + 1) * unit, range.upperBound, size)
            try await body(Int(index), pos ..< next, index * unit, &out)
            pos = next
        }
        return out
    }

    /// Every data run of the request is read at once (`readTogether`); holes are zeroed.
    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await readMapped(at: offset, into: buffer, layer: name, format: formatName, file: file, backing: nil,
                             runs: { try await runs(in: $0, maxRuns: 4096) }, source: { r in r.host.map { .host($0) } ?? .zeros })
    }

    func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        return try await runs(in: range, maxRuns: 1024).map {
            Extent(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : .data)
        }.coalesced()
    }
}
