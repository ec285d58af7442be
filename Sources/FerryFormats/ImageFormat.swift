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

/// A disk image format: a `BlockDevice` made over another `BlockDevice` (its file).
public protocol ImageFormat: Sendable {
    /// The name used with `-f` / `-O` and shown by `info` (`raw`, `qcow2`).
    static var name: String { get }
    /// Creation options accepted with `-o`, for `-o help` and for unknown-option errors.
    static var createOptions: [(name: String, help: String)] { get }
    /// True if `header` (the first bytes of a file, up to 4 KiB, fewer if the file is
    /// shorter) is this format's. Raw never claims a file: it is only the fallback.
    static func probe(header: UnsafeRawBufferPointer) -> Bool
    /// Opens the guest-visible device stored in `file`.
    static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice
    /// Lays out a new image of `size` guest bytes in the empty `file`, then opens it.
    /// Unknown `options` are an error, reported before anything is written.
    static func create(file: any BlockDevice, size: Int64, options: [String: String]) async throws -> any BlockDevice
    /// The size the host file must have for a new image of `size` guest bytes, before any
    /// data is written (raw: `size`; formats that grow: their metadata).
    static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64
    /// False for a format Ferry can read but not yet write.
    static var writable: Bool { get }
}

extension ImageFormat {
    public static var writable: Bool { true }
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
    public static let all: [any ImageFormat.Type] = [RawFormat.self, QCOW2Format.self]

    /// Formats that are recognised by their magic but cannot be read yet, so that such a file
    /// is never silently read as raw.
    public static let recognisedOnly: [(name: String, magic: [UInt8])] = [
        ("vmdk", Array("KDMV".utf8)),
        ("vdi", Array("<<< ".utf8)),
        ("vhdx", Array("vhdxfile".utf8)),
        ("vpc", Array("conectix".utf8)),
    ]

    public static func named(_ name: String) -> (any ImageFormat.Type)? {
        all.first { $0.name == name }
    }

    /// Checks a format name given by the user, with the list of names in the error. With
    /// `writing`, the format must also be one Ferry can write.
    public static func lookup(_ name: String, for path: String? = nil, writing: Bool = false) throws -> any ImageFormat.Type {
        if let f = named(name) {
            if writing && !f.writable {
                let list = all.filter { $0.writable }.map { $0.name }.joined(separator: ", ")
                throw FerryError(.notSupported, "format '\(name)' can be read but not written yet (writable: \(list))", path: path)
            }
            return f
        }
        if recognisedOnly.contains(where: { $0.name == name }) {
            throw FerryError(.notSupported, "format '\(name)' is not supported yet (supported: \(all.map { $0.name }.joined(separator: ", ")))", path: path)
        }
        throw FerryError(.invalidArgument, "unknown format '\(name)' (supported: \(all.map { $0.name }.joined(separator: ", ")))", path: path)
    }

    /// What a file's first bytes say it is: a known format, or nil for "nothing recognised".
    /// Throws for a format that is recognised but not supported.
    public static func probe(header: UnsafeRawBufferPointer, path: String) throws -> (any ImageFormat.Type)? {
        for f in all where f.probe(header: header) { return f }
        for (name, magic) in recognisedOnly where header.count >= magic.count && header.prefix(magic.count).elementsEqual(magic) {
            throw FerryError(.notSupported, "image is in \(name) format, which is not supported yet", path: path)
        }
        return nil
    }

    /// Checks `-o` options against a format's list before anything is created.
    public static func validate(options: [String: String], for format: any ImageFormat.Type, path: String?) throws {
        let known = Set(format.createOptions.map(\.name))
        for key in options.keys.sorted() where !known.contains(key) {
            let list = format.createOptions.map(\.name).joined(separator: ", ")
            throw FerryError(.invalidArgument, "unknown option '\(key)' for format \(format.name) (valid: \(list.isEmpty ? "none" : list))", path: path)
        }
    }
}
