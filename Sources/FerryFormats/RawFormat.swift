import FerryCore

/// The raw format: the image is the file, byte for byte.
public enum RawFormat: ImageFormat {
    public static let name = "raw"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size"),
        ("preallocation", "Preallocation mode (allowed values: off, falloc, full)"),
    ]

    public static func probe(header: UnsafeRawBufferPointer) -> Bool { false }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice { file }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        try checkPreallocation(options)
        return size
    }

    public static func checkOptions(_ options: [String: String]) throws { try checkPreallocation(options) }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        switch try checkPreallocation(options) {
        case "off":
            break
        case "falloc":
            // Allocated, reading as zeros: zeroing without permission to unmap.
            try await file.writeZeroes(at: 0, length: file.size, flags: [])
        default:
            let chunk = AlignedBuffer(count: 1 << 20)
            chunk.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
            var pos: Int64 = 0
            while pos < file.size {
                let n = Int(min(Int64(chunk.count), file.size - pos))
                try await file.write(at: pos, from: UnsafeRawBufferPointer(rebasing: chunk.bytes[0 ..< n]), flags: [])
                pos += Int64(n)
            }
        }
        return file
    }

    /// A raw image is its guest bytes, whatever the source holds and however it is
    /// preallocated, in whole 512-byte sectors.
    public static func measure(_ source: MeasureSource, options: [String: String]) async throws -> SizeMeasurement? {
        try checkPreallocation(options)
        guard source.size >= 0, source.size <= Int64.max - 511 else {
            throw FerryError(.invalidArgument, "invalid size \(source.size)")
        }
        let size = (source.size + 511) / 512 * 512
        return SizeMeasurement(required: size, fullyAllocated: size)
    }

    @discardableResult
    private static func checkPreallocation(_ options: [String: String]) throws -> String {
        let mode = options["preallocation"] ?? "off"
        guard ["off", "falloc", "full"].contains(mode) else {
            throw FerryError(.invalidArgument, "invalid preallocation mode '\(mode)' (allowed: off, falloc, full)")
        }
        return mode
    }
}
