import FerryCore

/// Microsoft's VHDX ([MS-VHDX] v2): dynamic, fixed and differencing images, read by
/// `VHDXReader`; new dynamic and fixed images written by `VHDXWriter`.
public enum VHDXFormat: ImageFormat {
    public static let name = "vhdx"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size; max of 64TB."),
        ("block_size", "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size."),
        ("block_state_zero", "Force use of payload blocks of type 'ZERO'."),
        ("log_size", "Log size; min 1MB."),
        ("subformat", "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
    ]
    public static let subformats = ["dynamic", "fixed"]

    public static func checkOptions(_ options: [String: String]) throws {
        _ = try VHDXCreateOptions(options)
    }

    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        let m = Array("vhdxfile".utf8)
        return header.count >= m.count && header.prefix(m.count).elementsEqual(m)
    }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        try VHDXWriter.initialFileSize(for: size, options: options)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        try await VHDXReader.open(file: file, context: context)
    }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        try await VHDXWriter.create(file: file, size: size, options: options, context: context)
    }
}
