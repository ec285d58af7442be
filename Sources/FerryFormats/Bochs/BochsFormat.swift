import FerryCore

/// Bochs "growing" disk images (a redolog with no base file; qemu's `bochs`), read only,
/// as the Bochs developer documentation ("Harddisk Images based on redologs") lays them out.
///
/// All numbers little-endian. A 512-byte header: magic "Bochs Virtual HD Image", type
/// "Redolog", subtype "Growing", version (0x00020000, or 0x00010000 without the timestamp
/// field), header size; then the catalog entry count, bitmap size and extent size (u32 each),
/// and the disk size (u64, at 88 in version 2, at 84 in version 1). The catalog follows the
/// header: one u32 per extent of the disk, 0xFFFFFFFF for one never written, else its index
/// among the extents stored after the catalog, each a sector bitmap (one bit per sector,
/// least significant bit first: written or not) and then the extent's sectors.
/// "Undoable" and "Volatile" redologs sit over a base image that the file does not name, so
/// they are refused.
public enum BochsFormat: ReadOnlyImageFormat {
    public static let name = "bochs"

    static let magic = Array("Bochs Virtual HD Image".utf8)
    static let redolog = Array("Redolog".utf8)
    static let growing = Array("Growing".utf8)
    static let headerSize = 512
    static let version1: UInt32 = 0x0001_0000, version2: UInt32 = 0x0002_0000
    static let maxExtentSize: UInt32 = 64 << 20

    /// The NUL-terminated string in the `count` bytes at `at`.
    static func field(_ h: UnsafeRawBufferPointer, _ at: Int, _ count: Int) -> [UInt8] {
        Array(h[at ..< at + count].prefix { $0 != 0 })
    }

    /// A growing redolog of a known version, as qemu-img probes it.
    public static func probe(header h: UnsafeRawBufferPointer) -> Bool {
        guard h.count >= 72 else { return false }
        let version = UInt32(h[64]) | UInt32(h[65]) << 8 | UInt32(h[66]) << 16 | UInt32(h[67]) << 24
        return field(h, 0, 32) == magic && field(h, 32, 16) == redolog && field(h, 48, 16) == growing
            && (version == version1 || version == version2)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        func corrupt(_ what: String, _ at: Int64) -> FerryError { FerryError(.corrupt, "bochs " + what, path: path, offset: at) }
        let bytes = try await readHeader(file, count: headerSize, context: context)
        let b = VHDXBytes(bytes)
        try bytes.withUnsafeBytes { h in
            guard field(h, 0, 32) == magic, field(h, 32, 16) == redolog else {
                throw corrupt("header has a bad magic (not a 'Bochs Virtual HD Image' redolog)", 0)
            }
            let sub = field(h, 48, 16)
            guard sub == growing else {
                throw FerryError(.notSupported, "bochs image is a '\(String(decoding: sub, as: UTF8.self))' redolog, which needs a base image; only 'Growing' images can be read",
                                 path: path, offset: 48)
            }
        }
        let version = b.u32(64)
        guard version == version1 || version == version2 else {
            throw corrupt("header has version 0x\(String(version, radix: 16)) (0x10000 and 0x20000 exist)", 64)
        }
        let catalogAt = Int64(b.u32(68))
        guard catalogAt >= Int64(headerSize) else { throw corrupt("header size \(catalogAt) is below \(headerSize)", 68) }
        let entries = Int64(b.u32(72)), bitmapSize = Int64(b.u32(76)), extent = b.u32(80)
        guard extent >= 512, extent <= maxExtentSize, extent % 512 == 0 else {
            throw corrupt("extent size \(extent) is not a multiple of 512 from 512 to \(maxExtentSize)", 80)
        }
        let extentSize = Int64(extent)
        guard bitmapSize * 8 >= extentSize / 512, bitmapSize <= extentSize else {
            throw corrupt("bitmap of \(bitmapSize) bytes does not fit the \(extentSize / 512) sectors of an extent", 76)
        }
        let diskAt = version == version2 ? 88 : 84
        let disk = b.u64(diskAt)
        guard disk <= UInt64(entries) * UInt64(extentSize) else {
            throw corrupt("disk size \(disk) needs more than the \(entries) extents of \(extentSize) bytes in the catalog", Int64(diskAt))
        }
        let dataAt = catalogAt + entries * 4
        guard dataAt <= file.size else {
            throw corrupt("catalog of \(entries) entries ends at offset \(dataAt), past the end of the file (\(file.size) bytes)", 72)
        }
        let used = Int((Int64(disk) + extentSize - 1) / extentSize)
        let catalog = VHDXBytes(try await vhdxReadBytes(file, at: catalogAt, count: used * 4))
        let stride = bitmapSize + extentSize
        var hosts = [Int64](repeating: -1, count: used)
        for i in 0 ..< used {
            let e = catalog.u32(i * 4)
            guard e != 0xFFFF_FFFF else { continue }
            let host = dataAt + Int64(e) * stride
            guard host + bitmapSize <= file.size else {
                throw corrupt("catalog entry \(i) puts its extent at file offset \(host), past the end of the file (\(file.size) bytes)",
                              catalogAt + Int64(i) * 4)
            }
            hosts[i] = host
        }
        return BochsDevice(name: path, file: file, size: Int64(disk), extentSize: extentSize, bitmapSize: bitmapSize, hosts: hosts)
    }
}
