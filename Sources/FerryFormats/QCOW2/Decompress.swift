import CZlib
import CZstd
import FerryCore

/// The compression used for a qcow2 image's compressed clusters.
enum QCOW2Compression: UInt8, Sendable {
    /// Raw deflate (RFC 1951, no zlib header); qemu writes it with a 4 KiB window.
    case deflate = 0
    case zstd = 1

    /// The name qemu-img info shows.
    var infoName: String { self == .deflate ? "zlib" : "zstd" }
}

/// A zstd decompression context kept between clusters.
private final class ZstdDecoder: @unchecked Sendable {
    let ctx: OpaquePointer?

    init() { ctx = ZSTD_createDCtx() }
    deinit { if let ctx { ZSTD_freeDCtx(ctx) } }

    /// Decompresses `input` until `output` is full. The compressed bytes of a cluster are
    /// rounded up to whole 512-byte sectors, so the frame may be followed by bytes that belong
    /// to nothing (or to the next cluster): decoding stops as soon as the cluster is complete.
    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let ctx, let inBase = input.baseAddress, let outBase = output.baseAddress else { return false }
        guard ZSTD_isError(ZSTD_DCtx_reset(ctx, ZSTD_reset_session_only)) == 0 else { return false }
        var inb = ZSTD_inBuffer(src: inBase, size: input.count, pos: 0)
        var outb = ZSTD_outBuffer(dst: outBase, size: output.count, pos: 0)
        while outb.pos < outb.size {
            let before = (inb.pos, outb.pos)
            let rc = ZSTD_decompressStream(ctx, &outb, &inb)
            if ZSTD_isError(rc) != 0 { return false }
            if outb.pos == outb.size { break }
            // No progress possible: the input ran out before the cluster was complete.
            if inb.pos == inb.size || (before.0 == inb.pos && before.1 == outb.pos) { return false }
        }
        return true
    }
}

/// Decompressors shared by the tasks reading an image: each task takes one, decompresses the
/// cluster it has just read, and gives it back, so clusters decompress in parallel.
final class Decompressors: Sendable {
    let kind: QCOW2Compression
    // Raw deflate with the largest window.
    private let inflaters = InflaterPool(windowBits: -15)
    private let zstds = Locked<[ZstdDecoder]>([])

    init(kind: QCOW2Compression) { self.kind = kind }

    func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        switch kind {
        case .deflate:
            // A whole cluster, or the data is broken.
            return inflaters.inflate(input, into: output) == output.count
        case .zstd:
            let d = zstds.withLock { $0.popLast() } ?? ZstdDecoder()
            defer { zstds.withLock { if $0.count < 16 { $0.append(d) } } }
            return d.decompress(input, into: output)
        }
    }
}
