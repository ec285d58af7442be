import CZlib
#if canImport(Glibc)
import Glibc
#endif
import CZstd
import FerryCore

/// A deflate stream kept between clusters: raw deflate (no zlib header) with a 4 KiB window
/// (window bits -12), which is what qemu's reader expects.
private final class Deflater: @unchecked Sendable {
    let stream = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    let ok: Bool

    init(level: Int32) {
        stream.initialize(to: z_stream())
        ok = deflateInit2_(stream, level, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK
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
        let rc = CZlib.deflate(stream, Z_FINISH)
        guard rc == Z_STREAM_END else { return nil }
        return output.count - Int(stream.pointee.avail_out)
    }
}

/// A zstd compression context kept between clusters.
private final class ZstdEncoder: @unchecked Sendable {
    let ctx: OpaquePointer?
    init() { ctx = ZSTD_createCCtx() }
    deinit { if let ctx { ZSTD_freeCCtx(ctx) } }

    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, level: Int32) -> Int? {
        guard let ctx, let src = input.baseAddress, let dst = output.baseAddress else { return nil }
        let n = ZSTD_compressCCtx(ctx, dst, output.count, src, input.count, level)
        return ZSTD_isError(n) != 0 ? nil : n
    }
}

/// Compressors shared by the tasks writing an image: each task takes one, compresses its
/// clusters, and gives it back, so clusters compress in parallel (one per worker).
final class Compressors: Sendable {
    let kind: QCOW2Compression
    /// zlib level 4: on binaries and text about 1.35 times as fast per core as qemu's level 6,
    /// with output about 2% larger (measured on bench/qcow2-write.sh's corpus). The
    /// environment variable FERRY_ZLIB_LEVEL (1 to 9) overrides it.
    static let deflateLevel: Int32 = {
        if let text = getenv("FERRY_ZLIB_LEVEL").map({ String(cString: $0) }), let v = Int32(text), (1 ... 9).contains(v) { return v }
        return 4
    }()
    /// zstd level: qemu's default (3).
    static let zstdLevel: Int32 = 3
    private let deflaters = Locked<[Deflater]>([])
    private let zstds = Locked<[ZstdEncoder]>([])

    init(kind: QCOW2Compression) { self.kind = kind }

    /// Compresses one cluster into `output`; nil if it does not shrink (fit in `output`).
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        switch kind {
        case .deflate:
            let d = deflaters.withLock { $0.popLast() } ?? Deflater(level: Self.deflateLevel)
            defer { deflaters.withLock { if $0.count < 64 { $0.append(d) } } }
            return d.deflate(input, into: output)
        case .zstd:
            let z = zstds.withLock { $0.popLast() } ?? ZstdEncoder()
            defer { zstds.withLock { if $0.count < 64 { $0.append(z) } } }
            return z.compress(input, into: output, level: Self.zstdLevel)
        }
    }
}
