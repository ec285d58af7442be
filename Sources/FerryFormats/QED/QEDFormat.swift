import FerryCore

/// QEMU Enhanced Disk (`qed`): read by `QEDDevice`, new images written by `QEDWriter`;
/// backing files like qcow2's.
///
/// An image whose need-check flag is set (not closed cleanly) is read as it is: its tables
/// are authoritative, and every entry is checked as for any image (cluster-aligned, inside
/// the file), so an entry left pointing past the end is an error, never a read of garbage.
public enum QEDFormat: ImageFormat {
    public static let name = "qed"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size"),
        ("backing_file", "File name of a base image"),
        ("backing_fmt", "Image format of the base image"),
        ("cluster_size", "Cluster size (in bytes)"),
        ("table_size", "L1/L2 table size (in clusters)"),
    ]

    public static func features(options: [String: String]) -> FormatFeatures { [.backingFile, .zeroRuns] }

    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        header.count >= 4 && header.prefix(4).elementsEqual(QEDHeader.magic)
    }

    public static func checkOptions(_ options: [String: String]) throws {
        _ = try QEDCreateOptions(options)
    }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        try QEDCreateOptions(options).fileLimit(size)
    }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        try await QEDWriter.create(name: context.location, file: file, size: size, options: options, backing: context.backing)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        guard context.readOnly else {
            throw FerryError(.notSupported, "existing qed images can only be read in this version of ferry (a new one can be written)", path: path)
        }
        let head = try await bytes(file, at: 0, count: Int(min(file.size, Int64(QEDHeader.size))))
        let header = try await QEDHeader.parse(head, fileSize: file.size, path: path) { try await bytes(file, at: $0, count: $1) }
        let l1raw = try await bytes(file, at: header.l1TableOffset, count: Int(header.tableBytes))
        let l1 = QEDDevice.entries(l1raw)

        var details = ImageDetails()
        details.clusterSize = Int(header.clusterSize)
        var backing: (any BlockDevice)?
        if let name = header.backingFilename {
            let full = resolveRelative(name, to: path)
            details.backingFilename = name
            details.fullBackingFilename = full
            details.backingFormat = header.backingFormat
            if context.opensBacking {
                backing = try await context.openBacking(full, header.backingFormat, context.depth + 1)
            }
        }
        return QEDDevice(name: path, file: file, header: header, l1: l1, backing: backing, details: details)
    }

    static func bytes(_ file: any BlockDevice, at offset: Int64, count: Int) async throws -> [UInt8] {
        guard count > 0 else { return [] }
        let buffer = AlignedBuffer(count: count)
        try await readHost(file, at: offset, into: buffer.mutableBytes)
        return Array(buffer.bytes)
    }
}
