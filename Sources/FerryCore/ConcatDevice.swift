/// Several devices read one after another as one (`ferry convert a b c out` copies the
/// three sources back to back into `out`). Read-only.
///
/// Errors keep the name and offset of the part they came from, so a failed read names the
/// real image.
public final class ConcatDevice: BlockDevice {
    public let parts: [any BlockDevice]
    /// Where each part starts in the concatenation.
    public let starts: [Int64]
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public var name: String { parts.map(\.name).joined(separator: " + ") }

    public init(_ parts: [any BlockDevice]) {
        precondition(!parts.isEmpty)
        self.parts = parts
        var starts: [Int64] = []
        var total: Int64 = 0
        for p in parts {
            starts.append(total)
            total += p.size
        }
        self.starts = starts
        self.size = total
        limits = BlockLimits(
            alignment: parts.map(\.limits.alignment).max()!,
            preferredTransfer: parts.map(\.limits.preferredTransfer).max()!,
            maximumTransfer: parts.map(\.limits.maximumTransfer).min()!)
        var caps: BlockCapabilities = [.extents, .cheapZeroReads]
        for p in parts { caps.formIntersection(p.capabilities) }
        capabilities = caps
    }

    /// Index of the part holding `offset` (the last one for `offset == size`).
    private func part(at offset: Int64) -> Int {
        var lo = 0, hi = parts.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if starts[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        // Skip empty parts.
        var i = lo
        while i < parts.count - 1 && starts[i] + parts[i].size <= offset { i += 1 }
        return i
    }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        var done = 0
        while done < buffer.count {
            let pos = offset + Int64(done)
            let i = part(at: pos)
            let within = pos - starts[i]
            let n = Int(min(Int64(buffer.count - done), parts[i].size - within))
            try await parts[i].read(at: within, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done ..< done + n]))
            done += n
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "a concatenation of sources is read-only", path: name)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "a concatenation of sources is read-only", path: name)
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        throw FerryError(.readOnly, "a concatenation of sources is read-only", path: name)
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, Int64(range.count))
        let i = part(at: range.lowerBound)
        let within = range.lowerBound - starts[i]
        let partEnd = min(parts[i].size, range.upperBound - starts[i])
        guard within < partEnd else { return [Extent(offset: range.lowerBound, length: 0, kind: .zero)] }
        let inner = try await parts[i].extents(in: within ..< partEnd)
        return inner.map { e in
            // A part's extent may run past the part's own end only up to its size.
            let end = min(e.end, parts[i].size)
            return Extent(offset: e.offset + starts[i], length: end - e.offset, kind: e.kind)
        }
    }

    public func flush() async throws {}

    public func close() async throws {
        var first: (any Error)?
        for p in parts {
            do { try await p.close() } catch { if first == nil { first = error } }
        }
        if let first { throw first }
    }
}
