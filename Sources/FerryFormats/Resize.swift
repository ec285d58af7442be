import FerryCore

/// What `resize` asks of a format: the image's file, opened for writing, and the new size.
public struct ResizeRequest: Sendable {
    /// The image as the user named it (for messages).
    public var location: String
    /// The image's file, opened for writing, at its present length.
    public var file: any BlockDevice
    /// The new guest size (checked to be positive; growing or shrinking is the format's to
    /// allow: a shrink arrives only with `--shrink`).
    public var size: Int64
    /// `--preallocation` for the added part: off, metadata, falloc or full.
    public var preallocation: String
    /// Sets the length of the file and returns it opened again at that length (the device
    /// given before is closed then and must not be used again).
    public var setFileLength: @Sendable (_ length: Int64) async throws -> any BlockDevice

    public init(location: String, file: any BlockDevice, size: Int64, preallocation: String,
                setFileLength: @escaping @Sendable (_ length: Int64) async throws -> any BlockDevice) {
        self.location = location
        self.file = file
        self.size = size
        self.preallocation = preallocation
        self.setFileLength = setFileLength
    }
}

extension ImageFormat {
    /// By default a format cannot be resized in place.
    public static func resize(_ request: ResizeRequest) async throws {
        throw FerryError(.notSupported, "format '\(name)' does not support resizing (ferry resizes \(Formats.all.filter { $0.resizable }.map { $0.name }.joined(separator: ", ")))", path: request.location)
    }

    public static var resizable: Bool { false }
}

/// Allocates `range` of `file` as zeros: `falloc` without writing, `full` by writing zeros
/// (a megabyte at a time), `off` not at all.
func preallocate(_ file: any BlockDevice, _ range: Range<Int64>, mode: String) async throws {
    switch mode {
    case "falloc":
        // Allocated, reading as zeros: zeroing without permission to unmap.
        try await file.writeZeroes(at: range.lowerBound, length: Int64(range.count), flags: [])
    case "full":
        let chunk = AlignedBuffer(count: 1 << 20)
        chunk.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        var pos = range.lowerBound
        while pos < range.upperBound {
            let n = Int(min(Int64(chunk.count), range.upperBound - pos))
            try await file.write(at: pos, from: UnsafeRawBufferPointer(rebasing: chunk.bytes[0 ..< n]), flags: [])
            pos += Int64(n)
        }
    default:
        break
    }
}
