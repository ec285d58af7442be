import FerryCore

/// The 64-byte header of a Parallels expandable image (qemu's `docs/interop/parallels.txt`),
/// little-endian, followed by the BAT: one 32-bit entry per cluster, the cluster's place in
/// the file (in sectors for "WithoutFreeSpace" images, in clusters for "WithouFreSpacExt"
/// ones), 0 for a cluster never written (reads as zeros).
struct ParallelsHeader: Sendable {
    static let size = 64
    static let sector: Int64 = 512
    static let magicOld = Array("WithoutFreeSpace".utf8)
    static let magicExt = Array("WithouFreSpacExt".utf8)
    /// `in_use` values: opened for writing, closed, and 0 (written by software older than
    /// the format extension).
    static let inUseOpen: UInt32 = 0x746F_6E59, inUseClosed: UInt32 = 0x312E_3276
    /// Largest cluster Ferry accepts (qemu's default is 1 MiB; old images used 31.5-256 KiB).
    static let maxClusterSectors: UInt32 = 1 << 21

    /// True for "WithouFreSpacExt" (BAT entries in clusters, 64-bit sector count).
    var ext: Bool
    var clusterSectors: Int64
    var batEntries: Int
    var sectors: Int64
    var inUse: UInt32
    /// Where the data area starts, in bytes.
    var dataOffset: Int64
    /// Flag bit 0, "Empty Image". Not honoured: qemu-img 7.2 reads the clusters the BAT
    /// names whatever it says, and so does Ferry (a stale flag then loses no data).
    var empty: Bool

    var clusterSize: Int64 { clusterSectors * Self.sector }
    var virtualSize: Int64 { sectors * Self.sector }
    /// An entry times this is the cluster's place in sectors.
    var entryUnit: Int64 { ext ? clusterSectors : 1 }
    /// True if the image was left open for writing (not closed cleanly).
    var dirty: Bool { inUse == Self.inUseOpen }

    static func probe(_ h: UnsafeRawBufferPointer) -> Bool {
        guard h.count >= 20 else { return false }
        let m = h.prefix(16)
        // Version 2 is the only one; checking it keeps a text file starting with the magic raw.
        return (m.elementsEqual(magicOld) || m.elementsEqual(magicExt)) && h[16] == 2 && h[17] == 0 && h[18] == 0 && h[19] == 0
    }

    /// Parses and checks the header (`size` bytes, read by `readHeader`) against the size of
    /// the file.
    init(_ bytes: [UInt8], fileSize: Int64, path: String) throws {
        func corrupt(_ what: String, _ at: Int64) -> FerryError {
            FerryError(.corrupt, "parallels " + what, path: path, offset: at)
        }
        let magic = Array(bytes[0 ..< 16])
        guard magic == Self.magicOld || magic == Self.magicExt else {
            throw corrupt("header has a bad magic (neither 'WithoutFreeSpace' nor 'WithouFreSpacExt')", 0)
        }
        ext = magic == Self.magicExt
        let b = VHDXBytes(bytes)
        let version = b.u32(16)
        guard version == 2 else { throw corrupt("header has version \(version) (only 2 exists)", 16) }
        let tracks = b.u32(28)
        guard tracks > 0, tracks <= Self.maxClusterSectors else {
            throw corrupt("cluster size of \(tracks) sectors is out of range (1 to \(Self.maxClusterSectors))", 28)
        }
        clusterSectors = Int64(tracks)
        batEntries = Int(b.u32(32))
        let rawSectors = b.u64(36)
        // "WithoutFreeSpace" images use only the low 32 bits of the sector count.
        let count = ext ? rawSectors : rawSectors & 0xFFFF_FFFF
        guard count <= UInt64(1) << 53 else { throw corrupt("disk size of \(count) sectors is too large", 36) }
        sectors = Int64(count)
        let clustersNeeded = (sectors + clusterSectors - 1) / clusterSectors
        guard Int64(batEntries) >= clustersNeeded else {
            throw corrupt("disk size of \(sectors) sectors needs \(clustersNeeded) clusters of \(clusterSectors) sectors, but the BAT has \(batEntries) entries", 32)
        }
        inUse = b.u32(44)
        guard inUse == 0 || inUse == Self.inUseOpen || inUse == Self.inUseClosed else {
            throw corrupt("in_use field holds the invalid value 0x\(String(inUse, radix: 16))", 44)
        }
        let batEnd = Int64(Self.size) + Int64(batEntries) * 4
        guard batEnd <= fileSize else {
            throw corrupt("BAT of \(batEntries) entries ends at offset \(batEnd), past the end of the file (\(fileSize) bytes)", 32)
        }
        let dataOff = Int64(b.u32(48))
        if dataOff == 0 {
            guard !ext else { throw corrupt("data_off is 0 in a 'WithouFreSpacExt' image", 48) }
            dataOffset = (batEnd + Self.sector - 1) / Self.sector * Self.sector
        } else {
            dataOffset = dataOff * Self.sector
            guard dataOffset >= batEnd else {
                throw corrupt("data area at offset \(dataOffset) (data_off \(dataOff)) overlaps the BAT, which ends at \(batEnd)", 48)
            }
        }
        empty = b.u32(52) & 1 != 0
    }
}
