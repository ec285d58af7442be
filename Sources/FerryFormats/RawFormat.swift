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
        try await preallocate(file, 0 ..< file.size, mode: try checkPreallocation(options))
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

    public static var resizable: Bool { true }

    /// The file takes the new size; a grown part is preallocated as asked.
    public static func resize(_ request: ResizeRequest) async throws {
        let mode = request.preallocation
        guard ["off", "falloc", "full"].contains(mode) else {
            throw FerryError(.invalidArgument, "Unsupported preallocation mode: \(mode)")
        }
        let old = request.file.size
        let file = try await request.setFileLength(request.size)
        if request.size > old { try await preallocate(file, old ..< request.size, mode: mode) }
        try await file.flush()
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
