/// Finding zeros in buffers fast: eight 64-bit words per branch, which runs at memory speed
/// where a byte loop would not.
public enum ZeroScan {
    /// True if every byte of `bytes` is zero.
    @inlinable
    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        var n = bytes.count
        var p = base
        // Unaligned head, byte by byte.
        while n > 0 && Int(bitPattern: p) & 7 != 0 {
            if p.load(as: UInt8.self) != 0 { return false }
            p += 1; n -= 1
        }
        var w = p.assumingMemoryBound(to: UInt64.self)
        while n >= 64 {
            let acc = w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]
            if acc != 0 { return false }
            w += 8; n -= 64
        }
        while n >= 8 {
            if w[0] != 0 { return false }
            w += 1; n -= 8
        }
        var b = UnsafeRawPointer(w)
        while n > 0 {
            if b.load(as: UInt8.self) != 0 { return false }
            b += 1; n -= 1
        }
        return true
    }

    /// A run of a scanned buffer: `range` is relative to the buffer.
    public struct Run: Sendable, Equatable {
        public var range: Range<Int>
        public var isZero: Bool
        public init(range: Range<Int>, isZero: Bool) { self.range = range; self.isZero = isZero }
    }

    /// Splits a buffer that holds the device bytes at `offset` into alternating data and zero
    /// runs. Zero detection works on granules of `granularity` bytes aligned to absolute device
    /// offsets (a partial granule at either end counts on its own); a run is zero only if every
    /// granule in it is all zeros. Neighbouring runs of the same kind are joined.
    public static func runs(in bytes: UnsafeRawBufferPointer, at offset: Int64, granularity: Int) -> [Run] {
        precondition(granularity > 0)
        var runs: [Run] = []
        var start = 0
        let count = bytes.count
        while start < count {
            let absolute = offset + Int64(start)
            let toBoundary = granularity - Int(absolute % Int64(granularity))
            let end = min(count, start + toBoundary)
            let zero = isZero(UnsafeRawBufferPointer(rebasing: bytes[start ..< end]))
            if let last = runs.last, last.isZero == zero {
                runs[runs.count - 1].range = last.range.lowerBound ..< end
            } else {
                runs.append(Run(range: start ..< end, isZero: zero))
            }
            start = end
        }
        return runs
    }
}
