import CLibDeflate
import CZlib
#if canImport(Glibc)
import Glibc
#endif
import FerryCore

/// A libdeflate compressor (zlib wrapper), kept between grains.
private final class LibDeflater: @unchecked Sendable {
    let compressor: OpaquePointer?
    init(level: Int32) { compressor = libdeflate_alloc_compressor(level) }
    deinit { libdeflate_free_compressor(compressor) }

    func deflate(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        guard let compressor, let src = input.baseAddress, let dst = output.baseAddress else { return nil }
        let n = libdeflate_zlib_compress(compressor, src, input.count, dst, output.count)
        return n == 0 ? nil : n
    }
}

/// Grain compressors shared by the engine's workers: each call takes one, so grains
/// compress in parallel, one per worker.
final class GrainCompressors: Sendable {
    /// qemu's level for VMDK grains (zlib's default, 6). FERRY_VMDK_ZLIB_LEVEL (1 to 9)
    /// overrides it.
    static let level: Int32 = {
        if let text = getenv("FERRY_VMDK_ZLIB_LEVEL").map({ String(cString: $0) }), let v = Int32(text), (1 ... 9).contains(v) { return v }
        return 6
    }()

    /// libdeflate unless FERRY_VMDK_DEFLATE=zlib. At the same level (6) libdeflate took 0.62
    /// of zlib's time for raw -> streamOptimized on bench/vmdk.sh's corpus (512 MiB, 2 cores:
    /// 4.9 s against 8.0 s; qemu-img 20.5 s), with output 1% smaller; both are zlib streams.
    static let useLibDeflate: Bool = {
        getenv("FERRY_VMDK_DEFLATE").map { String(cString: $0) != "zlib" } ?? true
    }()

    private let pool = Locked<[ZlibDeflater]>([])
    private let libPool = Locked<[LibDeflater]>([])
    /// Level 0 (stored blocks) for grains that do not shrink: still a valid zlib stream.
    private let stored = Locked<[ZlibDeflater]>([])

    /// An upper bound of the compressed size of `count` bytes (stored blocks and headers).
    static func bound(_ count: Int) -> Int { Int(compressBound(uLong(count))) }

    /// Compresses `input` into `output`; nil if it does not fit.
    func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer, store: Bool = false) -> Int? {
        if Self.useLibDeflate && !store {
            let d = libPool.withLock { $0.popLast() } ?? LibDeflater(level: Self.level)
            defer { libPool.withLock { if $0.count < 64 { $0.append(d) } } }
            return d.deflate(input, into: output)
        }
        let which = store ? stored : pool
        // A zlib stream (with header and Adler-32 trailer), as streamOptimized grains are stored.
        let d = which.withLock { $0.popLast() } ?? ZlibDeflater(level: store ? 0 : Self.level, windowBits: 15, memLevel: 8)
        defer { which.withLock { if $0.count < 64 { $0.append(d) } } }
        return d.deflate(input, into: output)
    }
}
