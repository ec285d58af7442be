import FerryCore
import FerryFile
import FerryFormats

/// An image as the user names it: a path (later, a URL) and, optionally, its format.
/// With no format, the format is probed from the image's first bytes.
public struct ImageSpec: Sendable, Equatable {
    public var location: String
    public var format: String?
    /// An internal snapshot to read instead of the active layer (`convert -l` / `-s`).
    public var snapshot: SnapshotSelector?
    public init(_ location: String, format: String? = nil, snapshot: SnapshotSelector? = nil) {
        self.location = location
        self.format = format
        self.snapshot = snapshot
    }
}

/// Everything `convert` can be told, with qemu-img's defaults.
public struct ConvertOptions: Sendable {
    /// `-O`: the target's format.
    public var targetFormat: String = Formats.fallback.name
    /// `-o`: the target format's creation options.
    public var targetOptions: [String: String] = [:]
    /// `-c`: compress the target's clusters (qcow2).
    public var compress: Bool = false
    /// `-B`: the new target is an overlay of this image (qcow2); only what the source holds
    /// above it is written.
    public var backingFile: String?
    /// `-F`: the format of `backingFile` (probed if nil).
    public var backingFormat: String?
    /// `-m`: requests in flight (workers), each with one buffer; nil finds the depth while
    /// copying, from what it measures.
    public var workers: Int?
    /// Size of each worker's buffer: the largest single read or write.
    public var bufferSize: Int = CopyConfiguration.defaultBufferSize
    /// Without `-m`, buffers shrink so the starting depth holds at most this many bytes (see
    /// `CopyConfiguration.requestWindow`); nil keeps `bufferSize`, as the command line does
    /// when `--buffer-size` is given.
    public var requestWindow: Int? = CopyConfiguration.defaultRequestWindow
    /// `-W` (true): writes may complete out of order; `--in-order` (false): they go out in
    /// guest order; nil: the target decides (in any order on files, devices and exports,
    /// in order into images that allocate as data arrives).
    public var outOfOrder: Bool?
    /// `--max-in-flight`: most bytes the buffers of requests in flight may hold.
    public var maxInFlight: Int = 128 << 20
    /// `-S`: zero runs at least this long (and aligned to it) in data are not written;
    /// 0 writes every byte so the target is fully allocated.
    public var sparseSize: Int = 4096
    /// `-n`: the target exists; don't create it.
    public var useExistingTarget: Bool = false
    /// `--target-is-zero` (with `-n`): the existing target reads as zeros already.
    public var targetIsZero: Bool = false
    /// `-T`: cache mode of the sources.
    public var sourceCache: CacheMode = .writeback
    /// Local source files that are large and mostly not in the page cache are read with
    /// O_DIRECT even under `writeback`. The command line turns this off when `-T` is given.
    public var directColdSources: Bool = true
    /// `-t`: cache mode of the target. Anything but `unsafe` flushes before success.
    public var targetCache: CacheMode = .writeback
    /// How I/O to local files is issued.
    public var fileEngine: FileDevice.IOEngine = .auto
    /// Connections to a network server that allows several (NBD multi-conn); requests in
    /// flight are spread over them. nil: each endpoint's default (see `EndpointOptions`).
    public var connections: Int?

    public static let maxConnections = 64
    /// `--timeout`, `--retries`, `--reconnects`: how network endpoints ride out a failing
    /// server (see `Resilience`).
    public var resilience: Resilience = .standard
    /// `-C`: copy data runs with `copy_file_range` between local raw files where the
    /// kernel can (no zero detection there).
    public var copyOffload: Bool = false
    /// `--salvage`: read errors of the sources become zeros, reported, and the copy goes on.
    public var salvage: Bool = false
    /// `--checksum[=ALG]`: the block hash (blkhash) of the guest data, computed as it passes.
    public var checksum: String? = nil
    /// `--untrusted`: the sources came from strangers (see `EndpointOptions.untrusted`).
    public var untrusted: Bool = false
    /// `-r`: most data bytes per second, evenly spaced; nil for no limit.
    public var rateLimit: Int?
    /// `-U`: read sources that another process holds open for writing.
    public var forceShare: Bool = false
    /// `--bitmaps`: copy the source's persistent bitmaps into the new target.
    public var bitmaps: Bool = false
    /// `--skip-broken-bitmaps`: with `bitmaps`, leave out bitmaps left in use (inconsistent)
    /// with a warning, rather than failing.
    public var skipBrokenBitmaps: Bool = false

    /// How the sources are opened.
    public var sourceEndpoint: EndpointOptions {
        EndpointOptions(cache: sourceCache, fileEngine: fileEngine, connections: connections,
                        directIfCold: directColdSources && sourceCache == .writeback, forceShare: forceShare,
                        untrusted: untrusted, resilience: resilience)
    }
    /// How the target is opened.
    public var targetEndpoint: EndpointOptions {
        EndpointOptions(cache: targetCache, fileEngine: fileEngine, connections: connections, resilience: resilience)
    }

    public static let maxWorkers = 1024
    public static let maxBufferSize = 256 << 20

    public init() {}

    /// Checks the options on their own, before any image is touched.
    public func validate() throws {
        if skipBrokenBitmaps && !bitmaps {
            throw FerryError(.invalidArgument, "Use of --skip-broken-bitmaps requires --bitmaps")
        }
        if bitmaps && useExistingTarget {
            throw FerryError(.notSupported, "--bitmaps copies bitmaps only into a target that ferry creates, not with -n")
        }
        if let checksum { _ = try BlockHasher(algorithm: checksum, size: 0) }
        if let workers, !(1 ... Self.maxWorkers).contains(workers) {
            throw FerryError(.invalidArgument, "invalid number of parallel requests \(workers) (allowed: 1 to \(Self.maxWorkers))")
        }
        guard maxInFlight >= bufferSize else {
            throw FerryError(.invalidArgument, "invalid bytes in flight \(maxInFlight) (allowed: at least the buffer size \(bufferSize))")
        }
        guard bufferSize >= 4096, bufferSize <= Self.maxBufferSize, bufferSize % 4096 == 0 else {
            throw FerryError(.invalidArgument, "invalid buffer size \(bufferSize) (allowed: multiples of 4096 up to \(Self.maxBufferSize))")
        }
        guard sparseSize >= 0, sparseSize % 512 == 0, sparseSize <= bufferSize else {
            throw FerryError(.invalidArgument, "invalid sparse size \(sparseSize) (allowed: multiples of 512 up to the buffer size \(bufferSize); 0 disables sparse detection)")
        }
        if let connections, !(1 ... Self.maxConnections).contains(connections) {
            throw FerryError(.invalidArgument, "invalid number of connections \(connections) (allowed: 1 to \(Self.maxConnections))")
        }
        if compress && useExistingTarget {
            throw FerryError(.invalidArgument, "-c (compression) cannot be used with -n (an existing target)")
        }
        if backingFile != nil && useExistingTarget {
            throw FerryError(.invalidArgument, "-B (a backing file) cannot be used with -n (an existing target)")
        }
        if backingFormat != nil && backingFile == nil {
            throw FerryError(.invalidArgument, "-F (the backing format) needs -B (a backing file)")
        }
        if compress, let p = targetOptions["preallocation"], p != "off" {
            throw FerryError(.invalidArgument, "-c (compression) cannot be used with preallocation=\(p)")
        }
        if targetIsZero && !useExistingTarget {
            throw FerryError(.invalidArgument, "--target-is-zero requires -n (an existing target)")
        }
    }
}

/// Counters of a copy, also delivered as progress while it runs.
public struct CopyStats: Sendable, Equatable {
    /// Guest bytes of the whole copy (the sum of the sources' sizes).
    public var virtualSize: Int64 = 0
    /// Bytes the sources hold as data: what progress counts toward (qemu-img counts the same).
    public var allocatedBytes: Int64 = 0
    /// Of `allocatedBytes`, how many are done.
    public var doneBytes: Int64 = 0
    /// Bytes read from the sources.
    public var bytesRead: Int64 = 0
    /// Bytes written to the target as data.
    public var bytesWritten: Int64 = 0
    /// Bytes made zero on the target by zero requests.
    public var bytesZeroed: Int64 = 0
    /// Bytes not touched because the target already reads as zeros there.
    public var bytesSkipped: Int64 = 0
    /// Every byte below this offset is done (the point a copy stopped at).
    public var completedThrough: Int64 = 0
    /// Time since the copy started, in seconds.
    public var elapsed: Double = 0
    /// One-line notes for the user once the copy is done (a manifest digest that matched).
    public var notes: [String] = []
    /// The block hash of the copy's guest data (`--checksum`), in hex, and its algorithm.
    public var checksum: String?
    public var checksumAlgorithm: String?
    /// Ranges of the sources (in guest offsets of the whole copy) that could not be read and
    /// were written as zeros (`--salvage`), in the order they were met.
    public var salvaged: [Range<Int64>] = []
    /// Requests allowed in flight now, and the most allowed at any time of the copy.
    public var depth: Int = 0
    public var peakDepth: Int = 0
    /// The cap on bytes held by the buffers of requests in flight.
    public var maxInFlight: Int = 0

    public init() {}

    /// Fraction of the work done, 0 to 1.
    public var fraction: Double {
        allocatedBytes > 0 ? min(1, Double(doneBytes) / Double(allocatedBytes)) : (virtualSize > 0 ? Double(completedThrough) / Double(virtualSize) : 1)
    }
}
