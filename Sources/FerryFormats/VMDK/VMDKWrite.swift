import FerryCore

/// Checks VMDK creation options. (Being written: see the VMDK issue.)
enum VMDKCreateOptions {
    static func check(_ options: [String: String]) throws {}
}

/// Writes new VMDK images. (Being written: see the VMDK issue.)
enum VMDKWriter {
    static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        throw FerryError(.notSupported, "vmdk images cannot be written yet")
    }

    static func create(file: any BlockDevice, size: Int64, options: [String: String],
                       context: CreateContext) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "vmdk images cannot be written yet", path: context.location)
    }
}
