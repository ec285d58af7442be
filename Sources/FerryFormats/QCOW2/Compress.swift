#if canImport(Glibc)
import Glibc
#endif
import CZstd
import FerryCore

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
    private let deflaters = Locked<[ZlibDeflater]>([])
    private let zstds = Locked<[ZstdEncoder]>([])

    init(kind: QCOW2Compression) { self.kind = kind }

    /// Compresses one cluster into `output`; nil if it does not shrink (fit in `output`).
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        switch kind {
        case .deflate:
            // Raw deflate (no zlib header) with a 4 KiB window: what qemu's reader expects.
            let d = deflaters.withLock { $0.popLast() } ?? ZlibDeflater(level: Self.deflateLevel, windowBits: -12, memLevel: 9)
            defer { deflaters.withLock { if $0.count < 64 { $0.append(d) } } }
            return d.deflate(input, into: output)
        case .zstd:
            let z = zstds.withLock { $0.popLast() } ?? ZstdEncoder()
            defer { zstds.withLock { if $0.count < 64 { $0.append(z) } } }
            return z.compress(input, into: output, level: Self.zstdLevel)
        }
    }
}
