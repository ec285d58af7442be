/// What a range of a device holds, as far as this layer knows.
public enum ExtentKind: Sendable, Hashable {
    /// Allocated in this layer; must be read to be known.
    case data
    /// Reads as zeros (a hole in a file, a zero cluster, an unmapped LBA). May or may not
    /// take space; reading it is a waste of time.
    case zero
    /// Not allocated: no layer of the device holds it, so it reads as zeros. (A format over a
    /// backing image answers `extents` for the whole chain: a range its own layer leaves to the
    /// backing image is whatever the backing image says. `LayeredDevice.layerExtents` tells
    /// one layer alone, where `.unallocated` means "falls through to the backing image"; a
    /// converter writing an overlay over the same backing file leaves such ranges alone.)
    case unallocated
}

/// A run of bytes `offset ..< offset + length` of one kind.
public struct Extent: Sendable, Hashable, CustomStringConvertible {
    public var offset: Int64
    public var length: Int64
    public var kind: ExtentKind

    public init(offset: Int64, length: Int64, kind: ExtentKind) {
        self.offset = offset
        self.length = length
        self.kind = kind
    }

    public var end: Int64 { offset + length }
    public var range: Range<Int64> { offset ..< offset + length }

    public var description: String { "\(kind)@\(offset)+\(length)" }
}

extension Array where Element == Extent {
    /// Joins neighbouring extents of the same kind; the protocol does not require it but
    /// callers (maps, plans) want the fewest runs.
    public func coalesced() -> [Extent] {
        var out: [Extent] = []
        out.reserveCapacity(count)
        for e in self where e.length > 0 {
            if let last = out.last, last.kind == e.kind, last.end == e.offset {
                out[out.count - 1].length += e.length
            } else {
                out.append(e)
            }
        }
        return out
    }
}

extension BlockDevice {
    /// Walks the extents of `range` a query at a time, calling `body` for each extent clipped
    /// to the range. Memory stays bounded whatever the size of the device.
    public func forEachExtent(in range: Range<Int64>, _ body: (Extent) async throws -> Void) async throws {
        var cursor = range.lowerBound
        while cursor < range.upperBound {
            let batch = try await extents(in: cursor ..< range.upperBound)
            guard let first = batch.first, first.offset == cursor, first.length > 0 else {
                throw FerryError(.corrupt, "extents at offset \(cursor) do not start where asked", path: name, offset: cursor)
            }
            for var e in batch {
                guard e.offset == cursor, e.length > 0 else {
                    throw FerryError(.corrupt, "extents are not contiguous at offset \(cursor)", path: name, offset: cursor)
                }
                if e.end > range.upperBound { e.length = range.upperBound - e.offset }
                try await body(e)
                cursor = e.end
                if cursor >= range.upperBound { break }
            }
        }
    }
}

/// A format with a backing image (qcow2 and the like).
public protocol LayeredDevice: BlockDevice {
    /// The backing image's guest-visible device, if there is one.
    var backing: (any BlockDevice)? { get }
    /// Like `extents`, but for this layer alone: `.unallocated` where reads fall through to
    /// the backing image.
    func layerExtents(in range: Range<Int64>) async throws -> [Extent]
}
