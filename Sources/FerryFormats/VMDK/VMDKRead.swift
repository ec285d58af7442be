import FerryCore

/// Opens VMDK images for reading. (Being written: see the VMDK issue.)
enum VMDKReader {
    static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        throw FerryError(.notSupported, "vmdk images cannot be read yet", path: context.location)
    }
}
