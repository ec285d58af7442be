import FerryCore

/// cloop, the Linux compressed loop device's image (Knoppix-era live CDs; qemu's `cloop`),
/// version 2.0, read only.
///
/// Layout, all numbers big-endian: a 128-byte shell-script preamble; the uncompressed block
/// size (u32) and the number of blocks (u32); `blocks + 1` file offsets (u64), block `i`
/// being the zlib stream from offset `i` to offset `i + 1`; then the streams. Every block
/// inflates to exactly the block size; the disk is `blocks` times the block size.
public enum CloopFormat: ReadOnlyImageFormat {
    public static let name = "cloop"

    /// The preamble `create_compressed_fs` writes for version 2.0 images, which is what
    /// qemu-img probes for too.
    static let preamble = Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)
    static let headerSize = 136
    static let maxBlockSize: UInt32 = 64 << 20

    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        header.count >= preamble.count && header.prefix(preamble.count).elementsEqual(preamble)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        func corrupt(_ what: String, _ at: Int64) -> FerryError { FerryError(.corrupt, "cloop " + what, path: path, offset: at) }
        let h = BigEndianBytes(bytes: try await readHeader(file, count: headerSize, context: context))
        let blockSize = h.u32(128), blocks = Int64(h.u32(132))
        guard blockSize >= 512, blockSize <= maxBlockSize, blockSize % 512 == 0 else {
            throw corrupt("block size \(blockSize) is not a multiple of 512 from 512 to \(maxBlockSize)", 128)
        }
        let tableEnd = Int64(headerSize) + (blocks + 1) * 8
        guard tableEnd <= file.size else {
            throw corrupt("offset table of \(blocks) blocks ends at \(tableEnd), past the end of the file (\(file.size) bytes)", 132)
        }
        let raw = BigEndianBytes(bytes: try await vhdxReadBytes(file, at: Int64(headerSize), count: Int(blocks + 1) * 8))
        let bs = Int64(blockSize)
        // A zlib stream of a block is never much longer than the block; more is a broken table.
        let maxCompressed = bs * 2 + 1024
        var offsets = [Int64](repeating: 0, count: Int(blocks) + 1)
        for i in 0 ... Int(blocks) {
            let o = raw.u64(i * 8)
            let at = Int64(headerSize + i * 8)
            guard o >= UInt64(tableEnd), o <= UInt64(file.size) else {
                throw corrupt("block \(i) starts at file offset \(o), outside the data after the offset table (\(tableEnd) to \(file.size))", at)
            }
            offsets[i] = Int64(o)
            if i > 0 {
                let length = offsets[i] - offsets[i - 1]
                guard length > 0, length <= maxCompressed else {
                    throw corrupt("block \(i - 1) has a compressed length of \(length) bytes (1 to \(maxCompressed) for blocks of \(bs))", at)
                }
            }
        }
        return CloopDevice(name: path, file: file, blockSize: bs, offsets: offsets)
    }
}
