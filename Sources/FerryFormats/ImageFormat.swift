import FerryCore

/// How an image's host file is opened, as qemu-img's `-t` / `-T` cache modes.
public enum CacheMode: String, Sendable, CaseIterable {
    /// O_DIRECT: no page cache; buffers, offsets and lengths aligned. Flushed at the end.
    case none
    /// Through the page cache; flushed at the end.
    case writeback
    /// Through the page cache; never flushed (fast, and lost on a crash).
    case unsafe
    /// Through the page cache with O_DSYNC: every write is durable when it completes.
    case writethrough
    /// O_DIRECT and O_DSYNC.
    case directsync

    public var direct: Bool { self == .none || self == .directsync }
    public var sync: Bool { self == .writethrough || self == .directsync }
    public var flushes: Bool { self != .unsafe }
}

/// What a format can store, declared so that the engine and the CLI never name a format.
public struct FormatFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Compressed clusters or grains (`convert -c`, or a subformat that always compresses).
    public static let compression = FormatFeatures(rawValue: 1 << 0)
    /// A backing (parent) image that unallocated ranges fall through to (`-B`, `-b`,
    /// `-o backing_file`).
    public static let backingFile = FormatFeatures(rawValue: 1 << 1)
    /// Zero runs are recorded without writing zero bytes (qcow2 zero clusters, VMDK zero grains).
    public static let zeroRuns = FormatFeatures(rawValue: 1 << 2)
    /// The image is written strictly front to back (streamOptimized VMDK): its devices say
    /// `.sequentialWrites`, and the engine keeps to guest order.
    public static let sequentialWrites = FormatFeatures(rawValue: 1 << 3)
    /// Persistent dirty bitmaps (`convert --bitmaps`): its new images' devices are
    /// `PersistentBitmapStore`s.
    public static let persistentBitmaps = FormatFeatures(rawValue: 1 << 4)
}

/// A disk image format: a `BlockDevice` made over another `BlockDevice` (its file).
///
/// Adding a format: one folder under `Sources/FerryFormats/`, one entry in `Formats.all`,
/// its tests. What the CLI and the engine need to know (compression, backing files, option
/// checks, order of writes) is declared here or by the devices it opens, never asked by name.
public protocol ImageFormat: Sendable {
    /// The name used with `-f` / `-O` and shown by `info` (`raw`, `qcow2`).
    static var name: String { get }
    /// Creation options accepted with `-o`, for `-o help` and for unknown-option errors.
    static var createOptions: [(name: String, help: String)] { get }
    /// What images of this format can do with these creation options (for example
    /// compression only for one subformat). The default is `features(options: [:])`'s
    /// union over every subformat, which formats give by overriding this.
    static func features(options: [String: String]) -> FormatFeatures
    /// Every feature some choice of options gives (for messages listing which formats can).
    static var allFeatures: FormatFeatures { get }
    /// Subformats selectable with `-o subformat=` (empty if there is no such choice).
    static var subformats: [String] { get }
    /// Checks the values of `-o` options (names are checked against `createOptions` before);
    /// throws a clear error before anything is created.
    static func checkOptions(_ options: [String: String]) throws
    /// True if `header` (the first bytes of a file, up to 4 KiB, fewer if the file is
    /// shorter) is this format's. Raw never claims a file: it is only the fallback.
    static func probe(header: UnsafeRawBufferPointer) -> Bool
    /// For a format known by its last bytes rather than its first (dmg's "koly" trailer):
    /// `magic`, `fromEnd` bytes before the end of the file. Nil for most formats.
    static var trailerMagic: (magic: [UInt8], fromEnd: Int)? { get }
    /// Opens the guest-visible device stored in `file`.
    static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice
    /// Lays out a new image of `size` guest bytes in the empty `file`, then opens it.
    /// Unknown `options` are an error, reported before anything is written.
    static func create(file: any BlockDevice, size: Int64, options: [String: String],
                       context: CreateContext) async throws -> any BlockDevice
    /// The size the host file must have for a new image of `size` guest bytes, before any
    /// data is written (raw: `size`; formats that grow: their metadata).
    static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64
    /// False for a format Ferry can read but not yet write.
    static var writable: Bool { get }
    /// The host file sizes a new image of this format with these creation options would
    /// need for `source` (`measure`), or nil if the format cannot say (the default, in
    /// `Measure.swift`). The options were checked by `Formats.validate` before.
    static func measure(_ source: MeasureSource, options: [String: String]) async throws -> SizeMeasurement?
    /// Changes the guest size of an image in place (`resize`); the default refuses (in
    /// `Resize.swift`), naming the formats that can.
    static func resize(_ request: ResizeRequest) async throws
    /// True for formats whose `resize` does something (for help and messages).
    static var resizable: Bool { get }
    /// True for formats whose images hold internal snapshots (listed in `ImageDetails`, read
    /// with `FormatContext.snapshot`); the default (in `Snapshots.swift`) is false.
    static var hasInternalSnapshots: Bool { get }
    /// Creates an internal snapshot (`snapshot -c`); the default (in `Snapshots.swift`)
    /// refuses.
    static func changeSnapshots(_ change: SnapshotChange) async throws
    /// Changes an existing image's header in place: `amend -o` options and, for `rebase -u`,
    /// its backing file; the default (in `Amend.swift`) refuses, as qemu-img does.
    static func amend(_ change: ImageAmendment) async throws
    /// Writes data into clusters the image's own layer leaves to its backing file (a safe
    /// `rebase`); the default (in `LayerFill.swift`) refuses.
    static func fillLayer(_ fill: LayerFill) async throws
    /// True for formats whose `check` looks at something (the default, in `Check.swift`, is false).
    static var hasCheck: Bool { get }
    /// Checks the image's metadata, and repairs what `request.repair` allows (`check`); the
    /// default says the format does not support checks, as qemu-img says for raw.
    static func check(_ request: CheckRequest) async throws -> CheckReport
}

extension ImageFormat {
    public static var writable: Bool { true }
    public static var subformats: [String] { [] }
    public static var trailerMagic: (magic: [UInt8], fromEnd: Int)? { nil }
    public static func checkOptions(_ options: [String: String]) throws {}
    public static func features(options: [String: String]) -> FormatFeatures { [] }
    public static var allFeatures: FormatFeatures { features(options: [:]) }
}

/// What a format needs to create an image beyond its first file.
public struct CreateContext: Sendable {
    /// Where the new image is, as the user gave it (for messages and sibling files).
    public var location: String
    /// The opened backing image, when the options name one and the format has
    /// `.backingFile` (reads of partial clusters fall through to it).
    public var backing: (any BlockDevice)?
    /// The backing image's format name, when there is one.
    public var backingFormat: String?
    /// Creates another new file of `size` bytes for the image (a VMDK extent), at a
    /// location already resolved against the image's directory, and opens it for writing.
    /// A copy that fails removes it again, with the image.
    public var createFile: @Sendable (_ location: String, _ size: Int64) async throws -> any BlockDevice

    public init(location: String, backing: (any BlockDevice)? = nil, backingFormat: String? = nil,
                createFile: @escaping @Sendable (_ location: String, _ size: Int64) async throws -> any BlockDevice = { location, _ in
                    throw FerryError(.notSupported, "this image needs more than one file, which cannot be created here", path: location)
                }) {
        self.location = location
        self.backing = backing
        self.backingFormat = backingFormat
        self.createFile = createFile
    }
}

/// What a format needs to know beyond its file: where the image is (for messages and for
/// backing paths relative to it) and how to open another image (its backing file).
public struct FormatContext: Sendable {
    /// The image's location as the user (or the overlay's header) gave it.
    public var location: String
    public var readOnly: Bool
    /// How many overlays stand above this image (0 for the image the user named).
    public var depth: Int
    /// Opens a backing image: a location (already resolved against the overlay's directory)
    /// and its format, or nil to probe. Returns the guest-visible device.
    public var openBacking: @Sendable (_ location: String, _ format: String?, _ depth: Int) async throws -> any BlockDevice
    /// Opens a plain file the image refers to (a qcow2 external data file): a location
    /// already resolved against the image's directory. Returns the file as it is.
    public var openFile: @Sendable (_ location: String) async throws -> any BlockDevice
    /// Receives one-line warnings about the image (a backing file whose format was guessed).
    public var warning: @Sendable (String) -> Void
    /// False to open the image without its backing image (to describe it, as `info` does
    /// without `--backing-chain`): reads of ranges the image leaves to it are then zeros.
    public var opensBacking: Bool = true
    /// An internal snapshot to open instead of the active layer (only asked of formats with
    /// `hasInternalSnapshots`); the device is then read-only and has the snapshot's size.
    public var snapshot: SnapshotSelector?

    public init(location: String, readOnly: Bool, depth: Int = 0,
                openBacking: @escaping @Sendable (_ location: String, _ format: String?, _ depth: Int) async throws -> any BlockDevice,
                openFile: @escaping @Sendable (_ location: String) async throws -> any BlockDevice = { location in
                    throw FerryError(.notSupported, "this image refers to another file, which cannot be opened here", path: location)
                },
                warning: @escaping @Sendable (String) -> Void = { _ in }) {
        self.location = location
        self.readOnly = readOnly
        self.depth = depth
        self.openBacking = openBacking
        self.openFile = openFile
        self.warning = warning
    }
}

/// The formats Ferry knows, by name.
public enum Formats {
    public static let all: [any ImageFormat.Type] = [RawFormat.self, QCOW2Format.self, VMDKFormat.self, VHDFormat.self, VHDXFormat.self,
                                                  VDIFormat.self, QEDFormat.self, ParallelsFormat.self, CloopFormat.self, BochsFormat.self,
                                                  DMGFormat.self]

    /// Formats that are recognised by the magic at their start but that Ferry does not read,
    /// so that such a file is never silently read as raw.
    public static let recognisedOnly: [(name: String, magic: [UInt8])] = [
        // qcow version 1 (the qcow2 probe leaves it alone): "QFI\xfb", then version 1.
        ("qcow", [0x51, 0x46, 0x49, 0xFB, 0, 0, 0, 1]),
        ("luks", Array("LUKS".utf8) + [0xBA, 0xBE]),
    ]

    /// What a file that no format claims is read as, and the default target format: the
    /// bytes as they are.
    public static let fallback: any ImageFormat.Type = RawFormat.self

    public static func named(_ name: String) -> (any ImageFormat.Type)? {
        all.first { $0.name == name }
    }

    /// Checks a format name given by the user, with the list of names in the error. With
    /// `writing`, the format must also be one Ferry can write.
    public static func lookup(_ name: String, for path: String? = nil, writing: Bool = false) throws -> any ImageFormat.Type {
        let writable = all.filter { $0.writable }.map { $0.name }.joined(separator: ", ")
        if let f = named(name) {
            if writing && !f.writable {
                throw FerryError(.notSupported, "format '\(name)' can be read but cannot be written (writable formats: \(writable))", path: path)
            }
            return f
        }
        if recognisedOnly.contains(where: { $0.name == name }) {
            if writing {
                throw FerryError(.notSupported, "format '\(name)' cannot be written (writable formats: \(writable))", path: path)
            }
            throw FerryError(.notSupported, "Ferry does not read format '\(name)' (readable formats: \(all.map { $0.name }.joined(separator: ", ")))", path: path)
        }
        throw FerryError(.invalidArgument, "unknown format '\(name)' (supported: \(all.map { $0.name }.joined(separator: ", ")))", path: path)
    }

    /// What a file's first bytes say it is: a known format, or nil for "nothing recognised".
    /// Throws for a format that is recognised but not read.
    public static func probe(header: UnsafeRawBufferPointer, path: String) throws -> (any ImageFormat.Type)? {
        for f in all where f.probe(header: header) { return f }
        for (name, magic) in recognisedOnly where header.count >= magic.count && header.prefix(magic.count).elementsEqual(magic) {
            throw notRead(name, path: path)
        }
        return nil
    }

    /// Every format that claims a file by its first bytes (`header`) or its last (`trailer`):
    /// more than one is a polyglot, a file built to be read differently by different tools.
    public static func claimants(header: UnsafeRawBufferPointer, trailer: UnsafeRawBufferPointer?) -> [String] {
        var names = all.filter { $0.probe(header: header) }.map { $0.name }
        names += recognisedOnly.filter { header.count >= $0.magic.count && header.prefix($0.magic.count).elementsEqual($0.magic) }.map(\.name)
        if let trailer {
            for f in all {
                guard let (magic, fromEnd) = f.trailerMagic, trailer.count >= fromEnd else { continue }
                let at = trailer.count - fromEnd
                if UnsafeRawBufferPointer(rebasing: trailer[at ..< at + magic.count]).elementsEqual(magic), !names.contains(f.name) {
                    names.append(f.name)
                }
            }
        }
        return names
    }

    /// How many bytes at the end of a file `probe(trailer:)` needs.
    public static var trailerBytes: Int { all.compactMap { $0.trailerMagic?.fromEnd }.max() ?? 0 }

    /// For a file whose first bytes no format claims: the format its last bytes (`trailer`, up
    /// to `trailerBytes`, ending at the end of the file) name, or nil.
    public static func probe(trailer: UnsafeRawBufferPointer) -> (any ImageFormat.Type)? {
        for f in all {
            guard let (magic, fromEnd) = f.trailerMagic, trailer.count >= fromEnd else { continue }
            let at = trailer.count - fromEnd
            if UnsafeRawBufferPointer(rebasing: trailer[at ..< at + magic.count]).elementsEqual(magic) { return f }
        }
        return nil
    }

    private static func notRead(_ name: String, path: String) -> FerryError {
        FerryError(.notSupported, "image is in \(name) format, which Ferry does not read", path: path)
    }

    /// Checks `-o` options against a format's list, then their values, before anything is
    /// created. `size` is left to the caller.
    public static func validate(options: [String: String], for format: any ImageFormat.Type, path: String?) throws {
        let known = Set(format.createOptions.map(\.name))
        for key in options.keys.sorted() where !known.contains(key) {
            let list = format.createOptions.map(\.name).joined(separator: ", ")
            throw FerryError(.invalidArgument, "unknown option '\(key)' for format \(format.name) (valid: \(list.isEmpty ? "none" : list))", path: path)
        }
        do { try format.checkOptions(options.filter { $0.key != "size" }) } catch let e as FerryError { throw e.at(path: path) }
    }

    /// Checks that `format` with `options` can do what the command asks for (`-c`, `-B`),
    /// with the formats that can in the error.
    public static func require(_ feature: FormatFeatures, of format: any ImageFormat.Type, options: [String: String],
                               for what: String, path: String?) throws {
        guard !format.features(options: options).contains(feature) else { return }
        var have = format.name
        if let sub = options["subformat"] { have += " subformat=\(sub)" }
        throw FerryError(.notSupported, "\(what) needs a target format that \(Self.phrase(feature)) (\(able(feature))), not \(have)", path: path)
    }

    /// The formats (and subformats) that have `feature`, for help and messages:
    /// `qcow2, vmdk subformat=streamOptimized`.
    public static func able(_ feature: FormatFeatures) -> String {
        all.filter { $0.allFeatures.contains(feature) }.map { f -> String in
            if f.features(options: [:]).contains(feature) && f.subformats.allSatisfy({ f.features(options: ["subformat": $0]).contains(feature) }) {
                return f.name
            }
            let with = f.subformats.filter { f.features(options: ["subformat": $0]).contains(feature) }
            let without = f.subformats.filter { !with.contains($0) }
            return without.count < with.count ? f.name + " but not subformat=" + without.joined(separator: "|")
                : f.name + " subformat=" + with.joined(separator: "|")
        }.joined(separator: ", ")
    }

    private static func phrase(_ feature: FormatFeatures) -> String {
        switch feature {
        case .compression: return "can compress"
        case .backingFile: return "has backing files"
        case .zeroRuns: return "stores zero runs"
        case .persistentBitmaps: return "stores persistent bitmaps"
        default: return "writes in order"
        }
    }
}
