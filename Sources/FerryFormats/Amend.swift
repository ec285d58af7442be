import FerryCore

/// A change to an existing image's header (`amend -o`, `rebase -u`).
public struct ImageAmendment: Sendable {
    /// The image as the user named it (for messages).
    public var location: String
    /// The image's file, opened for writing.
    public var file: any BlockDevice
    /// A new backing file name as it is to be written ("" for none), or nil to keep it.
    public var backingFile: String?
    /// The backing file's format to record with a new backing file (nil: none recorded).
    public var backingFormat: String?
    /// `-o` options of `amend` (names already checked against the format's create options).
    public var options: [String: String]
    /// As `ResizeRequest.setFileLength`, for a change that needs more room in the file (a
    /// new refcount width); nil where the file cannot grow.
    public var setFileLength: (@Sendable (_ length: Int64) async throws -> any BlockDevice)?

    public init(location: String, file: any BlockDevice, backingFile: String? = nil, backingFormat: String? = nil,
                options: [String: String] = [:], setFileLength: (@Sendable (_ length: Int64) async throws -> any BlockDevice)? = nil) {
        self.location = location
        self.file = file
        self.backingFile = backingFile
        self.backingFormat = backingFormat
        self.options = options
        self.setFileLength = setFileLength
    }
}

extension ImageFormat {
    /// By default a format's images cannot be changed in place.
    public static func amend(_ change: ImageAmendment) async throws {
        throw FerryError(.notSupported, "Format driver '\(name)' does not support option amendment")
    }
}
