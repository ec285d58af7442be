/// A read-only window `start ..< start + size` of another device, seen as a device of its
/// own: a member of a tar archive (a disk inside an OVA) read in place.
///
/// Extents pass through from the device underneath, clipped to the window and shifted to
/// start at 0. The window does not own `base` unless `ownsBase` (then `close` closes it).
public final class SliceDevice: BlockDevice {
    public let base: any BlockDevice
    /// Where the window starts in `base`.
    public let start: Int64
    public let size: Int64
    public let name: String
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    private let ownsBase: Bool

    /// The window must lie inside `base` (checked: a caller passes numbers from a file).
    public init(_ base: any BlockDevice, start: Int64, size: Int64, name: String, ownsBase: Bool) throws {
        guard start >= 0, size >= 0, start <= base.size, size <= base.size - start else {
            throw FerryError(.corrupt, "\(name) (\(size) bytes at offset \(start)) runs past the end of the file (\(base.size) bytes)",
                             path: base.name, offset: start)
        }
        self.base = base
        self.start = start
        self.size = size
        self.name = name
        self.ownsBase = ownsBase
        // Aligned requests stay aligned in `base` only if the window starts on a boundary.
        let a = base.limits.alignment
        limits = start % Int64(a) == 0 ? base.limits
            : BlockLimits(alignment: 1, preferredTransfer: base.limits.preferredTransfer, maximumTransfer: base.limits.maximumTransfer)
        capabilities = base.capabilities.intersection([.extents, .cheapZeroReads])
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        do {
            try await base.read(at: start + offset, into: buffer)
        } catch let e as FerryError {
            // Say where in the member, not where in the archive.
            var m = e
            if m.path == base.name { m.path = name; m.offset = offset }
            throw m
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "a member of an archive is read-only", path: name)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "a member of an archive is read-only", path: name)
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        throw FerryError(.readOnly, "a member of an archive is read-only", path: name)
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, Int64(range.count))
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .zero)] }
        let inner = try await base.extents(in: start + range.lowerBound ..< start + range.upperBound)
        var out: [Extent] = []
        out.reserveCapacity(inner.count)
        for e in inner {
            let lo = max(e.offset, start), hi = min(e.end, start + size)
            guard hi > lo else { continue }
            out.append(Extent(offset: lo - start, length: hi - lo, kind: e.kind))
        }
        guard let first = out.first, first.offset == range.lowerBound else {
            throw FerryError(.corrupt, "extents at offset \(start + range.lowerBound) do not start where asked", path: base.name,
                             offset: start + range.lowerBound)
        }
        return out
    }

    public func flush() async throws {}

    public func close() async throws {
        if ownsBase { try await base.close() }
    }
}
