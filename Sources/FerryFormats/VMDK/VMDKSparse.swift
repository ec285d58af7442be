import CZlib
import FerryCore
#if canImport(Glibc)
import Glibc
#endif

/// Little-endian fields of a VMDK header.
struct VMDKReadBytes {
    let bytes: [UInt8]
    func u8(_ at: Int) -> UInt8 { at < bytes.count ? bytes[at] : 0 }
    func u16(_ at: Int) -> UInt16 { UInt16(u8(at)) | UInt16(u8(at + 1)) << 8 }
    func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) | UInt32(u16(at + 2)) << 16 }
    func u64(_ at: Int) -> UInt64 { UInt64(u32(at)) | UInt64(u32(at + 4)) << 32 }
}

/// Reads `count` bytes at `offset` (zeros past the end of the file).
func vmdkReadBytes(_ file: any BlockDevice, at offset: Int64, count: Int) async throws -> [UInt8] {
    guard count > 0 else { return [] }
    let buffer = AlignedBuffer(count: count)
    try await readHost(file, at: offset, into: buffer.mutableBytes)
    return Array(buffer.bytes)
}

/// A hosted sparse extent: `KDMV` (monolithicSparse, streamOptimized, twoGbMaxExtentSparse)
/// or `COWD` (vmfsSparse, old Workstation).
///
/// The grain directory is read whole at open (its size is checked against the file first);
/// grain tables come through a bounded `VMDKReadTableCache`, read many at a time.
final class VMDKSparseExtent: Sendable {
    let file: any BlockDevice
    let name: String
    /// Guest bytes the header says the extent holds.
    let capacity: Int64
    let grainBytes: Int64
    let tableEntries: Int64
    let directory: [UInt32]
    let compressed: Bool
    /// Grain table entry 1 means "reads as zeros" (VMDK 4 zeroed-grain GTEs).
    let zeroedGrains: Bool
    let cow: Bool
    let cache: VMDKReadTableCache
    /// The embedded descriptor's text, at most `VMDKParsedDescriptor.maxBytes` (a COWD file
    /// keeps its CIDs as text in the sector after the header, where qemu-img looks for them).
    let descriptor: [UInt8]?
    let descriptorOffset: Int64

    static let magic: UInt32 = 0x564D_444B      // "KDMV"
    static let cowMagic: UInt32 = 0x4457_4F43   // "COWD"
    static let gdAtEnd: UInt64 = 0xFFFF_FFFF_FFFF_FFFF
    static let flagZeroedGrain: UInt32 = 1 << 2
    static let flagCompressed: UInt32 = 1 << 16
    static let flagMarkers: UInt32 = 1 << 17
    /// Largest grain Ferry reads: a compressed grain is inflated into a buffer this big.
    static let maxGrainSectors: UInt64 = 1 << 16
    static let maxTableEntries: UInt64 = 4096
    static let maxDirectoryEntries: UInt64 = 32 << 20

    private init(file: any BlockDevice, name: String, capacity: Int64, grainBytes: Int64, tableEntries: Int64,
                 directory: [UInt32], compressed: Bool, zeroedGrains: Bool, cow: Bool,
                 descriptor: [UInt8]?, descriptorOffset: Int64) {
        self.file = file
        self.name = name
        self.capacity = capacity
        self.grainBytes = grainBytes
        self.tableEntries = tableEntries
        self.directory = directory
        self.compressed = compressed
        self.zeroedGrains = zeroedGrains
        self.cow = cow
        self.descriptor = descriptor
        self.descriptorOffset = descriptorOffset
        self.cache = VMDKReadTableCache(capacity: max(64, (16 << 20) / (Int(tableEntries) * 4)))
    }

    private static func corrupt(_ what: String, _ path: String, _ offset: Int64) -> FerryError {
        FerryError(.corrupt, "vmdk " + what, path: path, offset: offset)
    }

    /// Opens the sparse extent in `file` (its first sector already read into `first`).
    static func open(_ file: any BlockDevice, name: String, first: [UInt8]) async throws -> VMDKSparseExtent {
        var h = VMDKReadBytes(bytes: first)
        guard file.size >= 512 else { throw corrupt("sparse header is truncated (the file has \(file.size) bytes)", name, 0) }
        if h.u32(0) == cowMagic { return try await openCOWD(file, name: name, header: h) }
        guard h.u32(0) == magic else { throw corrupt("sparse extent has no KDMV or COWD magic", name, 0) }
        var headerAt: Int64 = 0
        let version = h.u32(4)
        guard version >= 1 && version <= 3 else {
            throw FerryError(.notSupported, "vmdk sparse header version \(version) is not supported", path: name, offset: 4)
        }
        // streamOptimized: the grain directory is written last, and so is the header that
        // finds it (a footer: marker, header copy, end-of-stream marker at the end of the file).
        if h.u64(56) == gdAtEnd {
            guard file.size >= 1536 + 512 else { throw corrupt("stream has no footer (the file has \(file.size) bytes)", name, 0) }
            headerAt = file.size - 1024
            let footer = VMDKReadBytes(bytes: try await vmdkReadBytes(file, at: headerAt, count: 512))
            let marker = VMDKReadBytes(bytes: try await vmdkReadBytes(file, at: headerAt - 512, count: 16))
            let eos = VMDKReadBytes(bytes: try await vmdkReadBytes(file, at: headerAt + 512, count: 16))
            guard footer.u32(0) == magic, marker.u32(8) == 0, marker.u32(12) == 3, eos.u64(0) == 0, eos.u32(8) == 0, eos.u32(12) == 0 else {
                throw corrupt("footer at offset \(headerAt) is missing or invalid (the header's grain directory is at the end of the stream)", name, headerAt)
            }
            guard footer.u64(56) != gdAtEnd else {
                throw corrupt("footer at offset \(headerAt) has no grain directory offset", name, headerAt)
            }
            h = footer
        }
        let flags = h.u32(8)
        let capacitySectors = h.u64(12)
        let grainSectors = h.u64(20)
        let descOffset = h.u64(28)
        let descSize = h.u64(36)
        let gtes = UInt64(h.u32(44))
        let gdOffset = h.u64(56)
        let compressAlgorithm = h.u16(77)
        guard grainSectors >= 1, grainSectors <= maxGrainSectors else {
            throw corrupt("sparse header at offset \(headerAt) has an invalid grain size of \(grainSectors) sectors", name, headerAt + 20)
        }
        guard gtes >= 1, gtes <= maxTableEntries else {
            throw corrupt("sparse header at offset \(headerAt) has an invalid number of grain table entries (\(gtes))", name, headerAt + 44)
        }
        guard capacitySectors <= UInt64(1) << 53 else {
            throw corrupt("sparse header at offset \(headerAt) has an invalid capacity of \(capacitySectors) sectors", name, headerAt + 12)
        }
        let compressed = flags & flagCompressed != 0
        if compressed && compressAlgorithm != 1 {
            throw FerryError(.notSupported, "vmdk compression algorithm \(compressAlgorithm) is not supported (only deflate)", path: name, offset: headerAt + 77)
        }
        var descriptor: [UInt8]?
        var descriptorAt: Int64 = 0
        if descOffset != 0 && descSize != 0 {
            guard descOffset < UInt64(file.size) / 512 else {
                throw corrupt("embedded descriptor at sector \(descOffset) lies past the end of the file", name, headerAt + 28)
            }
            descriptorAt = Int64(descOffset) * 512
            let n = Int(min(UInt64(VMDKParsedDescriptor.maxBytes), descSize.multipliedReportingOverflow(by: 512).overflow ? UInt64.max : descSize * 512,
                            UInt64(file.size - descriptorAt)))
            descriptor = try await vmdkReadBytes(file, at: descriptorAt, count: n)
        }
        let directory = try await readDirectory(file, name: name, capacitySectors: capacitySectors, grainSectors: grainSectors,
                                                tableEntries: gtes, gdSector: gdOffset, entryField: headerAt + 56)
        return VMDKSparseExtent(file: file, name: name, capacity: Int64(capacitySectors) * 512, grainBytes: Int64(grainSectors) * 512,
                                tableEntries: Int64(gtes), directory: directory, compressed: compressed,
                                zeroedGrains: flags & flagZeroedGrain != 0, cow: false,
                                descriptor: descriptor, descriptorOffset: descriptorAt)
    }

    /// COWD: version 4, flags 8, capacity 12, grain 16, directory sector 20, directory
    /// entries 24 (all 32-bit); grain tables of 4096 entries.
    private static func openCOWD(_ file: any BlockDevice, name: String, header h: VMDKReadBytes) async throws -> VMDKSparseExtent {
        let capacitySectors = UInt64(h.u32(12))
        let grainSectors = UInt64(h.u32(16))
        guard grainSectors >= 1, grainSectors <= maxGrainSectors else {
            throw corrupt("COWD header has an invalid grain size of \(grainSectors) sectors", name, 16)
        }
        let count = UInt64(h.u32(24))
        let directory = try await readDirectory(file, name: name, capacitySectors: capacitySectors, grainSectors: grainSectors,
                                                tableEntries: 4096, gdSector: UInt64(h.u32(20)), entryField: 20, stated: count)
        return VMDKSparseExtent(file: file, name: name, capacity: Int64(capacitySectors) * 512, grainBytes: Int64(grainSectors) * 512,
                                tableEntries: 4096, directory: directory, compressed: false, zeroedGrains: false, cow: true,
                                descriptor: try await vmdkReadBytes(file, at: 512, count: Int(min(file.size - 512, Int64(VMDKParsedDescriptor.maxBytes)))),
                                descriptorOffset: 512)
    }

    private static func readDirectory(_ file: any BlockDevice, name: String, capacitySectors: UInt64, grainSectors: UInt64,
                                      tableEntries: UInt64, gdSector: UInt64, entryField: Int64,
                                      stated: UInt64? = nil) async throws -> [UInt32] {
        let perTable = grainSectors * tableEntries
        let needed = (capacitySectors + perTable - 1) / perTable
        if let stated, stated < needed {
            throw corrupt("grain directory has \(stated) entries, too few for a capacity of \(capacitySectors) sectors", name, entryField + 4)
        }
        guard needed > 0 else { return [] }
        // As qemu: 32 Mi entries cover 8 TiB at the smallest grains, more than VMDK allows.
        guard needed <= maxDirectoryEntries else {
            throw FerryError(.notSupported, "vmdk grain directory of \(needed) entries is larger than Ferry reads (\(maxDirectoryEntries))", path: name, offset: entryField)
        }
        let bytes = needed * 4
        guard gdSector != 0, gdSector < UInt64(file.size) / 512, bytes <= UInt64(file.size) - gdSector * 512 else {
            throw corrupt("grain directory at sector \(gdSector) (\(bytes) bytes) lies past the end of the file (\(file.size) bytes)", name,
                          gdSector < UInt64(Int64.max / 512) ? Int64(gdSector) * 512 : entryField)
        }
        let at = Int64(gdSector) * 512
        var out: [UInt32] = []
        out.reserveCapacity(Int(needed))
        // In pieces: a directory is bounded by the file, but need not be read in one call.
        var done: UInt64 = 0
        while done < needed {
            let n = min(needed - done, 1 << 18)
            let r = VMDKReadBytes(bytes: try await vmdkReadBytes(file, at: at + Int64(done * 4), count: Int(n * 4)))
            for i in 0 ..< Int(n) { out.append(r.u32(i * 4)) }
            done += n
        }
        return out
    }

    // MARK: - lookup

    enum GrainKind { case unallocated, zero, data, compressed }

    /// The grain table covering extent offset `pos`, or nil where the directory has none.
    func table(for pos: Int64) async throws -> VMDKReadTable? {
        let index = Int(pos / (grainBytes * tableEntries))
        guard index < directory.count, directory[index] != 0 else { return nil }
        if let t = cache.table(index) { return t }
        return try await loadTables(from: index)
    }

    /// Most grain tables read with one call: tables written one after another (qemu-img
    /// writes them all at creation) are read together.
    static let tablesPerRead = 256
    /// The largest grain table, all zeros, to compare tables with.
    private static let zeros: AlignedBuffer = {
        let b = AlignedBuffer(count: Int(maxTableEntries) * 4)
        b.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        return b
    }()

    /// Reads the table of directory entry `first`, and the ones after it that follow it in
    /// the file, into the cache.
    private func loadTables(from first: Int) async throws -> VMDKReadTable {
        let tableBytes = Int64(tableEntries) * 4
        let sectorsPerTable = UInt32(tableBytes / 512)
        var last = first
        while last + 1 < directory.count, last + 1 - first < Self.tablesPerRead, tableBytes % 512 == 0,
              directory[last + 1] != 0, directory[last + 1] == directory[last] &+ sectorsPerTable {
            last += 1
        }
        let offset = Int64(directory[first]) * 512
        let count = last - first + 1
        guard offset <= file.size - tableBytes else {
            throw FerryError(.corrupt, "vmdk grain table at offset \(offset) lies past the end of the file (\(file.size) bytes)", path: name, offset: offset)
        }
        // Tables past the end of the file are left to their own call, which reports them.
        let whole = Int(min(Int64(count), (file.size - offset) / tableBytes))
        let raw = AlignedBuffer(count: whole * Int(tableBytes))
        try await readHost(file, at: offset, into: raw.mutableBytes)
        var tables: [(Int, VMDKReadTable)] = []
        tables.reserveCapacity(whole)
        let n = Int(tableEntries)
        for t in 0 ..< whole {
            let bytes = UnsafeRawBufferPointer(rebasing: raw.bytes[t * Int(tableBytes) ..< (t + 1) * Int(tableBytes)])
            // Most tables of a big image are empty: say so without decoding them.
            if memcmp(bytes.baseAddress!, Self.zeros.bytes.baseAddress!, bytes.count) == 0 {
                tables.append((first + t, VMDKReadTable(entries: [], empty: true)))
                continue
            }
            let entries = [UInt32](unsafeUninitializedCapacity: n) { out, count in
                for i in 0 ..< n { out[i] = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i * 4, as: UInt32.self)) }
                count = n
            }
            tables.append((first + t, VMDKReadTable(entries: entries, empty: false)))
        }
        cache.insert(tables)
        return tables[0].1
    }

    /// What the grain holding extent offset `pos` is, and where it lives: the host offset of
    /// the grain's start, or of its marker when compressed.
    func grain(_ table: VMDKReadTable, at pos: Int64) throws -> (GrainKind, Int64) {
        let index = Int((pos / grainBytes) % tableEntries)
        let entry = table.entries[index]
        if entry == 0 { return (.unallocated, 0) }
        if entry == 1 && (zeroedGrains || !cow) { return (.zero, 0) }
        let host = Int64(entry) * 512
        guard host < file.size else {
            throw FerryError(.corrupt, "vmdk grain table entry for extent offset \(pos / grainBytes * grainBytes) points to \(host), past the end of the file (\(file.size) bytes)",
                             path: name, offset: host)
        }
        return (compressed ? .compressed : .data, host)
    }

    /// Most bytes a compressed grain's marker may claim: deflate's worst case for the grain.
    var maxCompressedBytes: Int { Int(grainBytes + grainBytes / 1024 * 8 + 1024) }

    /// Inflates the compressed grain whose marker is at `host` (the grain starts at extent
    /// offset `grainStart`) into `out` (one grain, or the part of it that is wanted when
    /// `needed` says less). `ahead` holds the file's bytes from `host` on, as far as the caller
    /// read them; what the marker claims beyond them is read here.
    func readCompressed(marker host: Int64, grainStart: Int64, ahead: UnsafeRawBufferPointer,
                        into out: UnsafeMutableRawBufferPointer, needed: Int, inflaters: InflaterPool) async throws {
        func bad(_ why: String) -> FerryError {
            FerryError(.corrupt, "vmdk compressed grain at offset \(host) (extent offset \(grainStart)) " + why, path: name, offset: host)
        }
        var input = ahead
        var own: AlignedBuffer?
        if input.count < 12 {
            let n = Int(min(4096, file.size - host))
            guard n >= 12 else { throw bad("is truncated") }
            own = AlignedBuffer(count: n)
            try await readHost(file, at: host, into: own!.mutableBytes)
            input = own!.bytes
        }
        let lba = UInt64(littleEndian: input.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let size = Int(UInt32(littleEndian: input.loadUnaligned(fromByteOffset: 8, as: UInt32.self)))
        guard lba == UInt64(grainStart / 512) else { throw bad("has a marker for sector \(lba), not \(grainStart / 512)") }
        guard size > 0, size <= maxCompressedBytes else { throw bad("claims \(size) compressed bytes (a grain is \(grainBytes) bytes)") }
        guard Int64(size) <= file.size - host - 12 else { throw bad("claims \(size) bytes, past the end of the file (\(file.size) bytes)") }
        if 12 + size > input.count {
            let whole = AlignedBuffer(count: 12 + size)
            UnsafeMutableRawBufferPointer(rebasing: whole.mutableBytes[0 ..< input.count]).copyMemory(from: input)
            try await readHost(file, at: host + Int64(input.count), into: whole.slice(input.count ..< 12 + size))
            own = whole
            input = whole.bytes
        }
        let produced = withExtendedLifetime(own) {
            inflaters.inflate(UnsafeRawBufferPointer(rebasing: input[12 ..< 12 + size]), into: out)
        }
        guard let produced, produced >= needed else { throw bad("of \(size) bytes does not inflate to a grain") }
        if produced < out.count {
            UnsafeMutableRawBufferPointer(rebasing: out[produced...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }
}

/// One grain table, decoded. `empty` when every entry is 0 (a table qemu-img wrote ahead).
final class VMDKReadTable: Sendable {
    let entries: [UInt32]
    let empty: Bool
    init(entries: [UInt32], empty: Bool) {
        self.entries = entries
        self.empty = empty
    }
}

/// A bounded cache of grain tables by directory index. Tables are loaded outside the lock
/// (two tasks missing the same table may both read it); when the cache is full the least
/// recently used quarter goes.
final class VMDKReadTableCache: Sendable {
    private struct State {
        var tables: [Int: (table: VMDKReadTable, lastUse: UInt64)] = [:]
        var clock: UInt64 = 0
        var loads = 0
    }
    private let state = Locked(State())
    let capacity: Int

    init(capacity: Int) { self.capacity = max(4, capacity) }

    /// How many tables were read from the file (for tests).
    var loads: Int { state.withLock { $0.loads } }

    func table(_ index: Int) -> VMDKReadTable? {
        state.withLock { s in
            guard let hit = s.tables[index] else { return nil }
            s.clock += 1
            s.tables[index] = (hit.table, s.clock)
            return hit.table
        }
    }

    func insert(_ tables: [(Int, VMDKReadTable)]) {
        state.withLock { s in
            s.loads += tables.count
            for (i, t) in tables.prefix(capacity / 2) {
                s.clock += 1
                s.tables[i] = (t, s.clock)
            }
            if s.tables.count > capacity {
                let old = s.tables.sorted { $0.value.lastUse < $1.value.lastUse }.prefix(s.tables.count - capacity * 3 / 4)
                for (k, _) in old { s.tables[k] = nil }
            }
        }
    }
}
