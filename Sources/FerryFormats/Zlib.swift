import CZlib
import FerryCore

/// A deflate stream kept between clusters or grains (reset, not rebuilt, for each one).
final class ZlibDeflater: @unchecked Sendable {
    let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    let ok: Bool

    /// `windowBits` and `memLevel` as zlib takes them: qcow2 wants raw deflate with a 4 KiB
    /// window (-12), VMDK a zlib stream (15).
    init(level: Int32, windowBits: Int32, memLevel: Int32) {
        stream.initialize(to: z_stream())
        ok = deflateInit2_(stream, level, Z_DEFLATED, windowBits, memLevel, Z_DEFAULT_STRATEGY, ZLIB_VERSION,
                           Int32(MemoryLayout<z_stream>.size)) == Z_OK
    }

    deinit {
        if ok { deflateEnd(stream) }
        stream.deinitialize(count: 1)
        stream.deallocate()
    }

    /// Compressed length, or nil if the result would not fit in `output`.
    func deflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        guard ok, deflateReset(stream) == Z_OK else { return nil }
        stream.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.pointee.avail_in = uInt(input.count)
        stream.pointee.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        stream.pointee.avail_out = uInt(output.count)
        guard CZlib.deflate(stream, Z_FINISH) == Z_STREAM_END else { return nil }
        return output.count - Int(stream.pointee.avail_out)
    }
}

/// An inflate stream kept between clusters or grains (reset, not rebuilt, for each one).
final class ZlibInflater: @unchecked Sendable {
    let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    let ok: Bool

    /// `windowBits` as zlib takes it: -15 for raw deflate (qcow2), 15 for a zlib stream (VMDK).
    /// The largest window reads streams written with any smaller one.
    init(windowBits: Int32) {
        stream.initialize(to: z_stream())
        ok = inflateInit2_(stream, windowBits, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK
    }

    deinit {
        if ok { inflateEnd(stream) }
        stream.deinitialize(count: 1)
        stream.deallocate()
    }

    /// The bytes produced: until the stream ends or `output` is full. Nil if the data is not
    /// a valid stream, or ends early without its end marker.
    func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        guard ok, inflateReset(stream) == Z_OK else { return nil }
        stream.pointee.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.pointee.avail_in = uInt(input.count)
        stream.pointee.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        stream.pointee.avail_out = uInt(output.count)
        let rc = CZlib.inflate(stream, Z_FINISH)
        guard rc == Z_STREAM_END || ((rc == Z_BUF_ERROR || rc == Z_OK) && stream.pointee.avail_out == 0) else { return nil }
        return output.count - Int(stream.pointee.avail_out)
    }
}

/// Inflaters shared by the tasks reading an image: each task takes one, inflates what it has
/// just read, and gives it back, so clusters inflate in parallel.
final class InflaterPool: Sendable {
    let windowBits: Int32
    private let pool = Locked<[ZlibInflater]>([])

    init(windowBits: Int32) { self.windowBits = windowBits }

    func inflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        let d = pool.withLock { $0.popLast() } ?? ZlibInflater(windowBits: windowBits)
        defer { pool.withLock { if $0.count < 16 { $0.append(d) } } }
        return d.inflate(input, into: output)
    }
}
