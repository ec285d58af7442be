import FerryCore

/// What `check -r` may repair, as qemu-img's `-r leaks` and `-r all`.
public enum CheckRepair: String, Sendable {
    case leaks, all
}

/// A consistency check of an image's metadata (`ferry check`).
public struct CheckRequest: Sendable {
    /// The image as the user named it (for messages).
    public var location: String
    /// The image's file, opened for writing when `repair` is set.
    public var file: any BlockDevice
    public var repair: CheckRepair?
    /// Opens another file of the image (a VMDK extent named by its descriptor) to read.
    public var openFile: @Sendable (_ location: String) async throws -> any BlockDevice
    /// Sets the length of the image's file and returns it opened again (a repair that cuts
    /// leaked space off the end); nil where the file cannot change length.
    public var setFileLength: (@Sendable (_ length: Int64) async throws -> any BlockDevice)?

    public init(location: String, file: any BlockDevice, repair: CheckRepair? = nil,
                openFile: @escaping @Sendable (_ location: String) async throws -> any BlockDevice = { location in
                    throw FerryError(.notSupported, "this image refers to another file, which cannot be opened here", path: location)
                }) {
        self.location = location
        self.file = file
        self.repair = repair
        self.openFile = openFile
    }

    public init(location: String, file: any BlockDevice, repair: CheckRepair?,
                openFile: @escaping @Sendable (_ location: String) async throws -> any BlockDevice,
                setFileLength: (@Sendable (_ length: Int64) async throws -> any BlockDevice)?) {
        self.init(location: location, file: file, repair: repair, openFile: openFile)
        self.setFileLength = setFileLength
    }
}

/// What a check found, in qemu-img check's terms.
public struct CheckReport: Sendable, Equatable {
    /// The lines qemu-img prints on stderr while checking, in order ("Leaked cluster ...",
    /// "ERROR ...", "Repairing ...").
    public var lines: [String] = []
    /// The indexes of `lines` that are error reports (qemu-img prefixes its name to them,
    /// Ferry "ferry: "); each names the image.
    public var complaints: Set<Int> = []
    public var corruptions = 0
    public var leaks = 0
    /// Errors of the check itself (metadata it could not read).
    public var checkErrors = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var imageEndOffset: Int64?
    /// Guest clusters, and how many are allocated, not next to the one before, compressed.
    public var totalClusters: Int64?
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0
    /// Why a repair stopped (after `lines`): the image needs what this check cannot do.
    public var failure: String?

    public init() {}

    /// An error report about the image, printed as Ferry prints errors.
    public mutating func complain(_ text: String) {
        complaints.insert(lines.count)
        lines.append(text)
    }

    /// qemu-img check's exit status: 0 clean, 2 corruptions (or errors of the check), 3
    /// leaks only.
    public var status: Int32 {
        if corruptions > 0 || checkErrors > 0 { return 2 }
        return leaks > 0 ? 3 : 0
    }
}

extension ImageFormat {
    /// By default a format has no check, as raw has none in qemu-img.
    public static var hasCheck: Bool { false }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        throw FerryError(.notSupported, "This image format does not support checks")
    }
}
