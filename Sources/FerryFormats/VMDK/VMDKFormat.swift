import FerryCore

/// VMware's VMDK (Virtual Disk Format 5.0): read by `VMDKReader`, new images written by
/// `VMDKWriter`.
public enum VMDKFormat: ImageFormat {
    public static let name = "vmdk"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size"),
        ("adapter_type", "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
        ("backing_file", "File name of a base image"),
        ("backing_fmt", "Must be 'vmdk' if present"),
        ("compat6", "VMDK version 6 image"),
        ("hwversion", "VMDK hardware version"),
        ("subformat", "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized}"),
        ("toolsversion", "VMware guest tools version"),
        ("zeroed_grain", "Enable efficient zero writes using the zeroed-grain GTE feature"),
    ]
    public static let subformats = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]

    public static func features(options: [String: String]) -> FormatFeatures {
        switch options["subformat"] ?? "monolithicSparse" {
        case "streamOptimized": return [.compression, .sequentialWrites, .backingFile]
        // qemu-img: "Flat image can't have backing file".
        case "monolithicFlat", "twoGbMaxExtentFlat": return []
        default: return options["zeroed_grain"] == "on" ? [.backingFile, .zeroRuns] : [.backingFile]
        }
    }

    public static var allFeatures: FormatFeatures { [.compression, .sequentialWrites, .backingFile, .zeroRuns] }

    /// The first 8 bytes of an seSparse extent (little-endian 0xcafebabe): claimed so that the
    /// reader can say the subformat is not supported, rather than it being read as raw.
    static let seSparseMagic: [UInt8] = [0xbe, 0xba, 0xfe, 0xca, 0, 0, 0, 0]

    /// A sparse extent (`KDMV`), a hosted sparse extent of old Workstation (`COWD`), an
    /// seSparse extent, or a text descriptor.
    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        func starts(_ s: String) -> Bool {
            let m = Array(s.utf8)
            return header.count >= m.count && header.prefix(m.count).elementsEqual(m)
        }
        let se = header.count >= seSparseMagic.count && header.prefix(seSparseMagic.count).elementsEqual(seSparseMagic)
        return starts("KDMV") || starts("COWD") || starts("# Disk DescriptorFile") || se
    }

    public static func checkOptions(_ options: [String: String]) throws {
        try VMDKCreateOptions.check(options)
    }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        try VMDKWriter.initialFileSize(for: size, options: options)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        try await VMDKReader.open(file: file, context: context)
    }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        try await VMDKWriter.create(file: file, size: size, options: options, context: context)
    }
}
