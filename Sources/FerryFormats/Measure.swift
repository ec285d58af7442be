import FerryCore

/// What `measure` knows about the image a new one would be converted from.
public struct MeasureSource: Sendable {
    /// The guest size of the new image.
    public var size: Int64
    /// Counts the source's bytes that hold data (not zeros, not unallocated), in whole units
    /// of the granularity given (a run touching a unit counts the whole unit). Nil when only a
    /// size was given (`--size`): the new image would hold no data.
    public var dataBytes: (@Sendable (_ granularity: Int64) async throws -> Int64)?
    /// The source's persistent dirty bitmaps, or nil when the source's format cannot hold
    /// any (then no bitmap size is reported, as qemu-img does).
    public var bitmaps: [QCOW2Bitmap]?

    public init(size: Int64, dataBytes: (@Sendable (_ granularity: Int64) async throws -> Int64)? = nil,
                bitmaps: [QCOW2Bitmap]? = nil) {
        self.size = size
        self.dataBytes = dataBytes
        self.bitmaps = bitmaps
    }
}

/// What `measure` reports, as qemu-img 7.2 does: the file a conversion would need, the file
/// a fully allocated image needs, and (for formats that can hold them) what the source's
/// bitmaps would add.
public struct SizeMeasurement: Sendable, Equatable {
    public var required: Int64
    public var fullyAllocated: Int64
    public var bitmaps: Int64?

    public init(required: Int64, fullyAllocated: Int64, bitmaps: Int64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }
}

extension ImageFormat {
    /// By default a format cannot say what its images would take (`measure` then says so,
    /// as qemu-img does for formats without size measurement).
    public static func measure(_ source: MeasureSource, options: [String: String]) async throws -> SizeMeasurement? { nil }
}
