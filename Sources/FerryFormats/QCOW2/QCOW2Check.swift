import FerryCore

/// `check` of a qcow2 image, with qemu-img check's lines and counts.
///
/// Every reference is counted from the header's structures: the header cluster, the active
/// L1 table and its L2 tables and data clusters (a compressed cluster counts every cluster
/// its sectors touch), the refcount table and its blocks, the snapshot table with each
/// snapshot's L1 table and what it reaches, the bitmap directory with each bitmap table and
/// its data clusters. Each cluster's stored refcount is compared with that count: more is a
/// leak, fewer a corruption. Then every cluster of the active tables must carry the COPIED
/// flag exactly when its refcount is 1.
///
/// Repairs (`-r leaks`: leaks and COPIED flags; `-r all`: refcounts that are too low too)
/// are made in place in the refcount blocks and tables. A cluster in use whose refcount is 0
/// may have been handed out again, so `-r all` then rebuilds the refcount structure instead,
/// as qemu-img does: new refcount blocks and table, from the counted references, in the first
/// free clusters, then the old ones released as leaks.
extension QCOW2Format {
    public static var hasCheck: Bool { true }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        let path = request.location
        // Only a rebuild of the refcount structure (under -r all) may grow the file.
        let setFileLength: @Sendable (Int64) async throws -> any BlockDevice = request.setFileLength ?? { _ in
            throw FerryError(.notSupported, "repairing this image needs its file to grow, which cannot be done here", path: path)
        }
        let m = try await QCOW2InPlace(file: request.file, path: path, checking: true, setFileLength: setFileLength)
        guard m.header.cryptMethod == 0 else {
            throw FerryError(.notSupported, "encrypted qcow2 images cannot be checked by ferry", path: path)
        }
        var c = QCOW2Checker(m)
        try await c.count()
        try await c.compare(repair: request.repair)
        if c.report.failure != nil { return c.report }
        if c.needsRebuild {
            try await c.rebuild()
            // Counted again against the new structure: the old one is leaked now, and released
            // without counting as a leak found (it was not in the image as given).
            let again = try await QCOW2InPlace(file: c.m.file, path: path, checking: true, setFileLength: setFileLength)
            var after = QCOW2Checker(again)
            try await after.count()
            let lines = after.report.lines
            after.report = c.report
            after.report.lines += lines
            try await after.releaseAfterRebuild()
            c = after
            if c.report.failure != nil { return c.report }
        }
        try await c.copiedFlags(repair: request.repair != nil)
        if request.repair != nil, c.report.leaksFixed + c.report.corruptionsFixed > 0 {
            try await c.clearMarks()
        }
        c.finish()
        return c.report
    }
}

struct QCOW2Checker {
    /// Mutable only for a rebuild, which may grow the file.
    var m: QCOW2InPlace
    let h: QCOW2Header
    let cs: Int64
    var report = CheckReport()
    /// References counted per host cluster.
    var refs: [Int64: UInt64] = [:]
    /// Refcount blocks as read (and repaired), by index.
    var blocks: [Int64: [UInt8]] = [:]
    var changedBlocks: Set<Int64> = []
    /// The active L1 table and its L2 tables, for the COPIED flags.
    var l1: [UInt64] = []
    var l2Tables: [Int: (offset: Int64, bytes: [UInt8])] = [:]
    /// Set by `compare` under `-r all` when a cluster in use has refcount 0.
    var needsRebuild = false
    /// Most clusters a rebuild counts in memory (8 bytes each): 4 TiB of 64 KiB clusters.
    static let rebuildLimit: Int64 = 1 << 26

    init(_ m: QCOW2InPlace) {
        self.m = m
        h = m.header
        cs = m.cs
    }

    static func hex(_ v: UInt64) -> String { String(v, radix: 16) }

    var fileClusters: Int64 { (m.file.size + cs - 1) / cs }
    /// Clusters to compare: the file's, and any a reference names past its end.
    var countedClusters: Int64 { max(fileClusters, (refs.keys.max() ?? -1) + 1) }

    mutating func corrupt(_ line: String) {
        report.lines.append(line)
        report.corruptions += 1
    }

    /// Every cluster of `offset ..< offset + bytes` gains a reference; a structure that
    /// starts past the end of the file (or ends far past it) is a corruption, counted
    /// nowhere. The last cluster may end past the end: a cluster written only in part (a
    /// subcluster of an extended L2 entry, the tail of a compressed one) leaves it short.
    mutating func reference(_ offset: Int64, bytes: Int64, _ what: StaticString) {
        guard bytes > 0 else { return }
        guard offset >= 0, offset < m.file.size, offset - m.file.size <= cs - bytes else {
            corrupt("ERROR \(what) (\(bytes) bytes at offset \(offset)) lies past the end of the file")
            return
        }
        for c in offset / cs ... (offset + bytes - 1) / cs { refs[c, default: 0] += 1 }
    }

    func inFile(_ offset: Int64, _ bytes: Int64) -> Bool {
        offset >= 0 && bytes >= 0 && offset <= m.file.size - bytes
    }

    // MARK: - counting references

    mutating func count() async throws {
        reference(0, bytes: min(cs, m.file.size), "header")
        // The active layer, with the allocation figures.
        let l1Bytes = Int64(h.l1Size) * 8
        if l1Bytes > 0 {
            guard inFile(h.l1TableOffset, l1Bytes) else {
                throw FerryError(.corrupt, "qcow2 L1 table (\(l1Bytes) bytes at \(h.l1TableOffset)) lies past the end of the file", path: m.path, offset: h.l1TableOffset)
            }
            reference(h.l1TableOffset, bytes: l1Bytes, "L1 table")
            let raw = try await m.read(at: h.l1TableOffset, count: Int(l1Bytes))
            l1 = (0 ..< h.l1Size).map { QCOW2InPlace.entry(raw, $0, bits: 64) }
        }
        try await countL1(l1, active: true)
        // Snapshots: their table, and each one's L1 table and what it reaches.
        if h.nbSnapshots > 0 {
            let length = try await QCOW2Format.snapshotTableLength(m, header: h)
            reference(h.snapshotsOffset, bytes: Int64(length), "snapshot table")
            for s in try await QCOW2Format.readSnapshots(m.file, header: h, path: m.path) {
                let bytes = Int64(s.l1Size) * 8
                guard bytes > 0 else { continue }
                guard s.l1Offset % cs == 0, bytes <= QCOW2Header.maxL1Bytes, inFile(s.l1Offset, bytes) else {
                    corrupt("ERROR snapshot \(s.id) (\(s.name)) l1_offset=\(Self.hex(UInt64(s.l1Offset))): L1 table is not cluster aligned, too large or lies past the end of the file; snapshot table entry corrupted")
                    continue
                }
                reference(s.l1Offset, bytes: bytes, "snapshot L1 table")
                let raw = try await m.read(at: s.l1Offset, count: Int(bytes))
                try await countL1((0 ..< s.l1Size).map { QCOW2InPlace.entry(raw, $0, bits: 64) }, active: false)
            }
        }
        // The refcount table and its blocks.
        reference(h.refcountTableOffset, bytes: Int64(h.refcountTableClusters) * cs, "refcount table")
        for (i, o) in m.reftable.enumerated() where o != 0 {
            guard Int64(o) % cs == 0, inFile(Int64(o), cs) else {
                corrupt("ERROR refcount block \(i) is not cluster aligned or lies past the end of the file; refcount table entry corrupted")
                continue
            }
            reference(Int64(o), bytes: cs, "refcount block")
        }
        // Persistent bitmaps: the directory, each table and its data clusters.
        for b in try await QCOW2Format.readBitmaps(m.file, header: h, path: m.path) {
            let bytes = b.tableSize * 8
            guard bytes > 0 else { continue }
            guard bytes <= QCOW2Header.maxL1Bytes, inFile(b.tableOffset, bytes) else {
                corrupt("ERROR bitmap '\(b.name)' table (\(bytes) bytes at offset \(b.tableOffset)) is too large or lies past the end of the file")
                continue
            }
            reference(b.tableOffset, bytes: bytes, "bitmap table")
            let raw = try await m.read(at: b.tableOffset, count: Int(bytes))
            for k in 0 ..< Int(b.tableSize) {
                let o = QCOW2InPlace.entry(raw, k, bits: 64) & 0x00FF_FFFF_FFFF_FE00
                if o != 0 { reference(Int64(o), bytes: cs, "bitmap data cluster") }
            }
        }
        if h.autoclear & QCOW2Header.bitmapsBit != 0, let ext = h.bitmaps, ext.count > 0 {
            reference(Int64(ext.directoryOffset), bytes: Int64(ext.directorySize), "bitmap directory")
        }
    }

    mutating func countL1(_ table: [UInt64], active: Bool) async throws {
        let words = h.l2EntryBytes / 8
        let sizeBits = UInt64(h.clusterBits - 8)
        let offsetBits = 62 - sizeBits
        for (i, e) in table.enumerated() {
            let l2 = Int64(e & QCOW2InPlace.offsetMask)
            guard l2 != 0 else { continue }
            guard l2 % cs == 0 else {
                corrupt("ERROR l2_offset=\(Self.hex(UInt64(l2))): Table is not cluster aligned; L1 entry corrupted")
                continue
            }
            guard inFile(l2, cs) else {
                corrupt("ERROR l2_offset=\(Self.hex(UInt64(l2))): Table lies past the end of the file; L1 entry corrupted")
                continue
            }
            reference(l2, bytes: cs, "L2 table")
            let bytes = try await m.read(at: l2, count: Int(cs))
            if active { l2Tables[i] = (l2, bytes) }
            // Contiguity is counted within each L2 table, as qemu-img counts it.
            var next: Int64 = 0
            for k in 0 ..< Int(cs) / h.l2EntryBytes {
                let entry = QCOW2InPlace.entry(bytes, k * words, bits: 64)
                if entry & QCOW2InPlace.compressedBit != 0 {
                    let start = Int64(entry & ((1 << offsetBits) - 1)) & ~511
                    let sectors = Int64((entry >> offsetBits) & ((1 << sizeBits) - 1)) + 1
                    reference(start, bytes: min(sectors * 512, max(0, m.file.size - start)), "compressed cluster")
                    if active {
                        // Compressed clusters are fragmented by nature: each one is read on its own.
                        report.allocatedClusters += 1
                        report.compressedClusters += 1
                        report.fragmentedClusters += 1
                    }
                    continue
                }
                let offset = Int64(entry & QCOW2InPlace.offsetMask)
                // In an external data file, guest cluster 0 sits at offset 0: the COPIED flag
                // says it is allocated.
                guard offset != 0 || (h.hasDataFile && entry & QCOW2InPlace.copiedBit != 0) else { continue }
                guard offset % cs == 0 else {
                    corrupt("ERROR offset=\(Self.hex(UInt64(offset))): Cluster is not properly aligned; L2 entry corrupted.")
                    continue
                }
                if !h.hasDataFile { reference(offset, bytes: cs, "data cluster") }
                if active {
                    report.allocatedClusters += 1
                    if next != 0 && offset != next { report.fragmentedClusters += 1 }
                    next = offset + cs
                }
            }
        }
    }

    // MARK: - stored refcounts

    mutating func block(_ index: Int64) async throws -> [UInt8]? {
        if let b = blocks[index] { return b }
        guard index < Int64(m.reftable.count) else { return nil }
        let o = Int64(m.reftable[Int(index)])
        guard o != 0, o % cs == 0, inFile(o, cs) else { return nil }
        let b = try await m.read(at: o, count: Int(cs))
        blocks[index] = b
        return b
    }

    mutating func stored(_ c: Int64) async throws -> UInt64 {
        let index = c / m.perBlock
        guard let b = try await block(index) else { return 0 }
        return QCOW2InPlace.entry(b, Int(c - index * m.perBlock), bits: m.refcountBits)
    }

    /// Sets a stored refcount; false if no refcount block holds it.
    mutating func setStored(_ c: Int64, _ v: UInt64) async throws -> Bool {
        let index = c / m.perBlock
        guard var b = try await block(index), v <= m.maxRefcount else { return false }
        QCOW2InPlace.setEntry(&b, Int(c - index * m.perBlock), bits: m.refcountBits, v)
        blocks[index] = b
        changedBlocks.insert(index)
        return true
    }

    // MARK: - comparing

    mutating func compare(repair: CheckRepair?) async throws {
        let n = countedClusters
        var leaked: [(Int64, UInt64, UInt64)] = [], low: [(Int64, UInt64, UInt64)] = []
        for c in 0 ..< n {
            let reference = refs[c] ?? 0
            let refcount = try await stored(c)
            guard refcount != reference else { continue }
            if refcount > reference {
                report.lines.append("Leaked cluster \(c) refcount=\(refcount) reference=\(reference)")
                report.leaks += 1
                leaked.append((c, refcount, reference))
            } else {
                corrupt("ERROR cluster \(c) refcount=\(refcount) reference=\(reference)")
                low.append((c, refcount, reference))
            }
        }
        guard let repair else { return }
        if repair == .all && low.contains(where: { $0.1 == 0 }) {
            // Everything found is mended by the rebuild.
            report.lines.append("Rebuilding refcount structure")
            report.leaksFixed += report.leaks
            report.corruptionsFixed += report.corruptions
            report.leaks = 0
            report.corruptions = 0
            needsRebuild = true
            return
        }
        if !low.isEmpty && repair == .leaks {
            report.lines.append("ERROR need to rebuild refcount structures")
            report.failure = "Check failed: Input/output error"
            return
        }
        for (c, refcount, reference) in leaked + (repair == .all ? low : []) {
            guard try await setStored(c, reference) else {
                report.lines.append("ERROR need to rebuild refcount structures")
                report.failure = "Check failed: cluster \(c) has no refcount block to repair its refcount in (qemu-img check -r all rebuilds the refcount structure)"
                break
            }
            report.lines.append("Repairing cluster \(c) refcount=\(refcount) reference=\(reference)")
            if refcount > reference {
                report.leaks -= 1
                report.leaksFixed += 1
            } else {
                report.corruptions -= 1
                report.corruptionsFixed += 1
            }
        }
        // What was repaired before a failure stays repaired.
        try await writeChangedBlocks()
        if report.failure != nil { try await m.flush() }
    }

    // MARK: - rebuilding

    /// Writes a new refcount structure from the counted references: each refcount block in
    /// the first free cluster from the start of the range it covers (counting the blocks and
    /// the table themselves), then the table in the first free run long enough, the file
    /// grown to hold them, and the header pointed at the new table last (qemu-img's layout).
    /// `m.file` is the file afterwards (reopened if it grew).
    mutating func rebuild() async throws {
        let n = countedClusters
        // One count per cluster of the file in memory: bounded, whatever the file claims.
        guard n <= Self.rebuildLimit else {
            throw FerryError(.notSupported, "the refcount structure needs rebuilding, but the file has \(n) clusters (ferry rebuilds up to \(Self.rebuildLimit))", path: m.path)
        }
        var counts = [UInt64](repeating: 0, count: Int(n))
        for (c, n) in refs where c >= 0 { counts[Int(c)] = n }
        func allocate(_ run: Int, from: Int = 0) -> Int {
            var start = from
            while true {
                if start + run > counts.count { counts += [UInt64](repeating: 0, count: start + run - counts.count) }
                if let used = (start ..< start + run).last(where: { counts[$0] != 0 }) {
                    start = used + 1
                    continue
                }
                for c in start ..< start + run { counts[c] = 1 }
                return start
            }
        }
        let per = Int(m.perBlock)
        var blockAt: [Int: Int] = [:]
        var table: (at: Int, clusters: Int)?
        // Allocating can put a cluster in use in a range no block covers yet, or need a
        // larger table: go round until nothing changes.
        while true {
            var changed = false
            for index in 0 ..< (counts.count + per - 1) / per where blockAt[index] == nil {
                guard counts[(index * per) ..< min(counts.count, (index + 1) * per)].contains(where: { $0 != 0 }) else { continue }
                // In the range it covers if it can be, else the first free cluster after.
                blockAt[index] = allocate(1, from: index * per)
                changed = true
            }
            let entries = (blockAt.keys.max() ?? 0) + 1
            let clusters = max(1, (entries * 8 + Int(cs) - 1) / Int(cs))
            if table == nil || table!.clusters < clusters {
                if let old = table { for c in old.at ..< old.at + old.clusters { counts[c] = 0 } }
                table = (allocate(clusters), clusters)
                changed = true
            }
            if !changed { break }
        }
        guard let table else { return }
        let end = Int64(counts.lastIndex(where: { $0 != 0 }) ?? 0) + 1
        if end * cs > m.file.size { try await m.setLength(end * cs) }
        for (index, at) in blockAt.sorted(by: { $0.key < $1.key }) {
            var block = [UInt8](repeating: 0, count: Int(cs))
            for c in (index * per) ..< min(counts.count, (index + 1) * per) where counts[c] != 0 {
                QCOW2InPlace.setEntry(&block, c - index * per, bits: m.refcountBits, min(counts[c], m.maxRefcount))
            }
            try await m.write(block, at: Int64(at) * cs)
        }
        var entries = [UInt8](repeating: 0, count: table.clusters * Int(cs))
        for (index, at) in blockAt { QCOW2HeaderWriter.put64(&entries, index * 8, UInt64(at) * UInt64(cs)) }
        try await m.write(entries, at: Int64(table.at) * cs)
        try await m.flush()
        // The header's refcount_table_offset (48) and refcount_table_clusters (56): the 12
        // bytes from 48, written once the structure they point at is on disk.
        var header = [UInt8](repeating: 0, count: 12)
        QCOW2HeaderWriter.put64(&header, 0, UInt64(table.at) * UInt64(cs))
        QCOW2HeaderWriter.put32(&header, 8, UInt32(table.clusters))
        try await m.write(header, at: 48)
        try await m.flush()
    }

    /// After a rebuild: the clusters of the old structure are leaks, released (and said, as
    /// qemu-img says them) without counting as leaks of the image. Anything else that differs
    /// means the rebuilt structure is wrong.
    mutating func releaseAfterRebuild() async throws {
        let n = countedClusters
        for c in 0 ..< n {
            let reference = refs[c] ?? 0
            let refcount = try await stored(c)
            guard refcount != reference else { continue }
            guard refcount > reference, try await setStored(c, reference) else {
                report.lines.append("ERROR rebuilt refcount structure is still broken")
                report.failure = "Check failed: cluster \(c) has refcount \(refcount) but \(reference) references after the rebuild"
                break
            }
            report.lines.append("Repairing cluster \(c) refcount=\(refcount) reference=\(reference)")
        }
        try await writeChangedBlocks()
        try await m.flush()
    }

    /// Writes the refcount blocks that repairs changed back where they came from.
    mutating func writeChangedBlocks() async throws {
        for index in changedBlocks.sorted() {
            try await m.write(blocks[index]!, at: Int64(m.reftable[Int(index)]))
        }
        changedBlocks = []
    }

    /// The COPIED flag of each active L1 and L2 entry says whether its cluster's refcount is 1.
    mutating func copiedFlags(repair: Bool) async throws {
        var l1Changed = false
        for i in l1.indices where l1[i] & QCOW2InPlace.offsetMask != 0 {
            let e = l1[i]
            let l2 = Int64(e & QCOW2InPlace.offsetMask)
            guard l2 % cs == 0 else { continue }
            let refcount = try await stored(l2 / cs)
            if (refcount == 1) != (e & QCOW2InPlace.copiedBit != 0) {
                let line = "OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(Self.hex(e)) refcount=\(refcount)"
                if repair {
                    report.lines.append("Repairing " + line)
                    l1[i] = refcount == 1 ? e | QCOW2InPlace.copiedBit : e & ~QCOW2InPlace.copiedBit
                    l1Changed = true
                    report.corruptionsFixed += 1
                } else {
                    corrupt("ERROR " + line)
                }
            }
            guard !h.hasDataFile, var table = l2Tables[i] else { continue }
            let words = h.l2EntryBytes / 8
            var changed = false
            for k in 0 ..< Int(cs) / h.l2EntryBytes {
                let entry = QCOW2InPlace.entry(table.bytes, k * words, bits: 64)
                let offset = Int64(entry & QCOW2InPlace.offsetMask)
                guard entry & QCOW2InPlace.compressedBit == 0, offset != 0, offset % cs == 0 else { continue }
                let refcount = try await stored(offset / cs)
                guard (refcount == 1) != (entry & QCOW2InPlace.copiedBit != 0) else { continue }
                let line = "OFLAG_COPIED data cluster: l2_entry=\(Self.hex(entry)) refcount=\(refcount)"
                if repair {
                    report.lines.append("Repairing " + line)
                    QCOW2InPlace.setEntry(&table.bytes, k * words, bits: 64,
                                          refcount == 1 ? entry | QCOW2InPlace.copiedBit : entry & ~QCOW2InPlace.copiedBit)
                    changed = true
                    report.corruptionsFixed += 1
                } else {
                    corrupt("ERROR " + line)
                }
            }
            if changed {
                try await m.write(table.bytes, at: table.offset)
                l2Tables[i] = table
            }
        }
        if l1Changed {
            var bytes = [UInt8](repeating: 0, count: l1.count * 8)
            for (i, e) in l1.enumerated() { QCOW2InPlace.setEntry(&bytes, i, bits: 64, e) }
            try await m.write(bytes, at: h.l1TableOffset)
        }
    }

    /// After repairs: the dirty and corrupt marks go, and everything reaches the disk.
    mutating func clearMarks() async throws {
        if h.version >= 3, h.dirty || h.corrupt {
            let features = h.incompatible & ~(QCOW2Header.dirtyBit | QCOW2Header.corruptBit)
            try await m.write((0 ..< 8).map { UInt8(truncatingIfNeeded: features >> UInt64(56 - 8 * $0)) }, at: 72)
        }
        try await m.flush()
    }

    mutating func finish() {
        report.totalClusters = (h.size + cs - 1) / cs
        // The end of the last cluster in use (stored or referenced).
        var last: Int64 = -1
        for (c, n) in refs where n > 0 { last = max(last, c) }
        for (index, b) in blocks {
            for i in stride(from: Int(m.perBlock) - 1, through: 0, by: -1)
            where QCOW2InPlace.entry(b, i, bits: m.refcountBits) != 0 {
                last = max(last, index * m.perBlock + Int64(i))
                break
            }
        }
        report.imageEndOffset = (last + 1) * cs
    }
}
