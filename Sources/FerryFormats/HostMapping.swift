import FerryCore

/// One run of a layer's own allocation, with where it lives in the host file.
public struct LayerMapping: Sendable, Equatable {
    public var offset: Int64
    public var length: Int64
    /// `.data`, `.zero`, or `.unallocated` (falls through to the backing image).
    public var kind: ExtentKind
    /// Where the run's bytes are in the host file (or external data file), if they are
    /// stored plainly there (not for compressed runs, nor for zero or unallocated runs without
    /// an allocation; an unallocated subcluster of an allocated cluster has one).
    public var hostOffset: Int64?
    /// The file `hostOffset` points into, when it is not the layer's `hostFileName` (an
    /// image of several extent files).
    public var hostFile: String?
    /// A `.data` run stored plainly whose bytes the host file knows to be zeros (a hole in a
    /// VMDK flat extent file): qemu-img map calls it both data and zero.
    public var readsAsZero: Bool

    public init(offset: Int64, length: Int64, kind: ExtentKind, hostOffset: Int64?, hostFile: String? = nil,
                readsAsZero: Bool = false) {
        self.offset = offset
        self.length = length
        self.kind = kind
        self.hostOffset = hostOffset
        self.hostFile = hostFile
        self.readsAsZero = readsAsZero
    }

    public var end: Int64 { offset + length }
}

/// A layered format that can say where each run of its own layer is stored (for `map`).
public protocol HostMappedDevice: LayeredDevice {
    /// This layer's runs from `range.lowerBound` on: ascending, contiguous, non-empty, may stop
    /// short of `range.upperBound`.
    func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping]
    /// The name of the file that `LayerMapping.hostOffset` points into.
    var hostFileName: String { get }
}

/// A value in `info`'s format-specific section: printed as JSON, or as qemu-img's indented
/// human form.
public indirect enum InfoValue: Sendable, Equatable {
    case string(String)
    case int(Int64)
    case bool(Bool)
    case list([InfoValue])
    case object([(String, InfoValue)])

    public static func == (a: InfoValue, b: InfoValue) -> Bool {
        switch (a, b) {
        case let (.string(x), .string(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.bool(x), .bool(y)): return x == y
        case let (.list(x), .list(y)): return x == y
        case let (.object(x), .object(y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }
}

/// What `info` shows about an image beyond its size, for formats that have more to say.
public struct ImageDetails: Sendable, Equatable {
    public var clusterSize: Int?
    public var dirty: Bool = false
    /// False when the image cannot say (qemu-img then prints neither dirty-flag nor
    /// cluster-size): a VMDK whose extents are of different kinds.
    public var dirtyKnown: Bool = true
    /// The backing file name as the header stores it.
    public var backingFilename: String?
    /// The backing file name resolved against the image's directory.
    public var fullBackingFilename: String?
    /// The backing format as the header names it.
    public var backingFormat: String?
    public var snapshots: [QCOW2Snapshot] = []
    /// `{type, data}` as qemu-img's `format-specific`.
    public var formatSpecific: InfoValue?
    /// The image's other files (VMDK extents), counted in its disk size as qemu-img does.
    public var extraFiles: [String] = []
    /// The image's persistent dirty bitmaps, or nil when its format (or version) cannot hold
    /// any (for `measure`).
    public var persistentBitmaps: [QCOW2Bitmap]?

    public init() {}
}

/// A format that describes itself for `info`.
public protocol DescribedDevice: BlockDevice {
    var details: ImageDetails { get }
    /// The format's name (`qcow2`).
    var formatName: String { get }
}

/// Resolves a backing or data file name written in an image against the image's directory,
/// as qemu does: absolute names stay, relative ones are relative to the image.
public func resolveRelative(_ name: String, to image: String) -> String {
    if name.hasPrefix("/") || name.contains("://") { return name }
    guard let slash = image.lastIndex(of: "/") else { return name }
    return String(image[...slash]) + name
}
