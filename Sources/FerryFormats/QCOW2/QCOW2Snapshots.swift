#if canImport(Glibc)
import Glibc
#endif
import FerryCore

extension QCOW2Format {
    /// Creates an internal snapshot of the active layer (`snapshot -c`): every cluster the
    /// active L1 and L2 tables reach gains a reference (refcounts raised first), the tables
    /// lose their COPIED flags, a copy of the L1 table and a new snapshot table (the old
    /// entries and the new one) go into new clusters, then the header points at the new
    /// table and the old table is freed. The new snapshot's ID is one more than the largest.
    public static func changeSnapshots(_ change: SnapshotChange) async throws {
        switch change.action {
        case .create(let name): try await createSnapshot(change, name: name)
        case .delete(let which): try await deleteSnapshot(change, which: which)
        case .apply(let which): try await applySnapshot(change, which: which)
        }
    }

    static func createSnapshot(_ change: SnapshotChange, name: String) async throws {
        let path = change.location
        var m = try await QCOW2InPlace(file: change.file, path: path, setFileLength: change.setFileLength)
        let h = m.header
        if h.hasDataFile { throw FerryError(.notSupported, "ferry cannot snapshot qcow2 images with an external data file", path: path) }
        if h.autoclear & QCOW2Header.bitmapsBit != 0, let b = h.bitmaps, b.count > 0 {
            throw FerryError(.notSupported, "ferry cannot snapshot qcow2 images with persistent bitmaps yet", path: path)
        }
        let cs = m.cs
        let existing = try await readSnapshots(m.file, header: h, path: path)
        guard existing.count < Int(QCOW2Header.maxSnapshots) - 1 else {
            throw FerryError(.notSupported, "qcow2 image has too many snapshots", path: path)
        }

        // The old snapshot table, read before anything changes (the file may end before
        // the padding of its last entry).
        let oldTableBytes = try await snapshotTableLength(m, header: h)
        var table: [UInt8] = []
        if h.nbSnapshots > 0 {
            table = try await m.read(at: h.snapshotsOffset, count: Int(min(Int64(oldTableBytes), m.file.size - h.snapshotsOffset)))
            table += [UInt8](repeating: 0, count: oldTableBytes - table.count)
        }

        // Every cluster the active tables reach, counted.
        let raw = h.l1Size > 0 ? try await m.read(at: h.l1TableOffset, count: h.l1Size * 8) : []
        var l1 = (0 ..< h.l1Size).map { QCOW2InPlace.entry(raw, $0, bits: 64) }
        var (counts, tables) = try await references(m, l1: l1)
        for t in tables.indices {
            for k in 0 ..< Int(cs) / h.l2EntryBytes {
                let e = QCOW2InPlace.entry(tables[t].bytes, k * h.l2EntryBytes / 8, bits: 64)
                if e & QCOW2InPlace.copiedBit != 0 {
                    QCOW2InPlace.setEntry(&tables[t].bytes, k * h.l2EntryBytes / 8, bits: 64, e & ~QCOW2InPlace.copiedBit)
                }
            }
        }
        for i in l1.indices { l1[i] &= ~QCOW2InPlace.copiedBit }
        try await m.adjust(counts: counts, by: 1)
        try await m.flush()
        for t in tables { try await m.write(t.bytes, at: t.offset) }

        // The snapshot's L1 table and the new snapshot table, in new clusters.
        var l1Bytes = [UInt8](repeating: 0, count: h.l1Size * 8)
        for (i, e) in l1.enumerated() { QCOW2InPlace.setEntry(&l1Bytes, i, bits: 64, e) }
        let l1Clusters = (Int64(l1Bytes.count) + cs - 1) / cs
        let id = String((existing.compactMap { Int($0.id) }.max() ?? 0) + 1)
        var entry = [UInt8](repeating: 0, count: 40 + 24)
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let idBytes = Array(id.utf8), nameBytes = Array(name.utf8)
        guard nameBytes.count <= 65535 else { throw FerryError(.invalidArgument, "snapshot name is too long", path: path) }
        QCOW2InPlace.setEntry(&entry, 2, bits: 32, UInt64(h.l1Size))
        QCOW2InPlace.setEntry(&entry, 6, bits: 16, UInt64(idBytes.count))
        QCOW2InPlace.setEntry(&entry, 7, bits: 16, UInt64(nameBytes.count))
        QCOW2InPlace.setEntry(&entry, 4, bits: 32, UInt64(now.tv_sec))
        QCOW2InPlace.setEntry(&entry, 5, bits: 32, UInt64(now.tv_nsec))
        QCOW2InPlace.setEntry(&entry, 9, bits: 32, 24)       // extra data: 24 bytes
        QCOW2InPlace.setEntry(&entry, 6, bits: 64, UInt64(h.size)) // extra: vm state 0, disk size, icount 0
        entry += idBytes + nameBytes
        entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
        let tableClusters = (Int64(table.count + entry.count) + cs - 1) / cs
        let base = try await m.allocate(clusters: l1Clusters + tableClusters)
        QCOW2InPlace.setEntry(&entry, 0, bits: 64, UInt64(h.l1Size > 0 ? base : 0))
        table += entry
        if !l1Bytes.isEmpty { try await m.write(l1Bytes, at: base) }
        try await m.write(table, at: base + l1Clusters * cs)
        try await m.flush()
        // The active L1 table without COPIED flags, then the header.
        if !l1Bytes.isEmpty { try await m.write(l1Bytes, at: h.l1TableOffset) }
        try await m.flush()
        var fields = [UInt8](repeating: 0, count: 12)
        QCOW2InPlace.setEntry(&fields, 0, bits: 32, UInt64(h.nbSnapshots + 1))
        for k in 0 ..< 8 { fields[4 + k] = UInt8(truncatingIfNeeded: UInt64(base + l1Clusters * cs) >> UInt64(56 - 8 * k)) }
        try await m.write(fields, at: 60)
        try await m.flush()
        if h.nbSnapshots > 0 && oldTableBytes > 0 {
            try await m.adjust(clusters: h.snapshotsOffset / cs, count: (Int64(oldTableBytes) + cs - 1) / cs, by: -1)
            try await m.flush()
        }
    }

    /// The clusters an L1 table reaches (its L2 tables and, through them, data clusters,
    /// compressed ones by every cluster their sectors touch), each counted once per
    /// reference, and the L2 tables as read.
    static func references(_ m: QCOW2InPlace, l1: [UInt64]) async throws -> ([Int64: Int], [(offset: Int64, bytes: [UInt8])]) {
        let cs = m.cs, path = m.path
        var counts: [Int64: Int] = [:]
        var tables: [(offset: Int64, bytes: [UInt8])] = []
        for i in 0 ..< l1.count {
            let l2 = Int64(l1[i] & QCOW2InPlace.offsetMask)
            guard l2 != 0 else { continue }
            guard l2 % cs == 0 else { throw FerryError(.corrupt, "qcow2 L2 table \(i) at \(l2) is not cluster aligned", path: path, offset: l2) }
            counts[l2 / cs, default: 0] += 1
            let table = try await m.read(at: l2, count: Int(cs))
            m.countReferences(of: table, into: &counts)
            tables.append((l2, table))
        }
        return (counts, tables)
    }

    /// Deletes a snapshot (`snapshot -d`): a new snapshot table without it goes into new
    /// clusters and the header points at it first (a crash after that only leaks clusters);
    /// then every cluster its L1 table reaches, and that table and the old snapshot table,
    /// lose a reference; then the active tables get COPIED flags where a cluster is theirs alone.
    static func deleteSnapshot(_ change: SnapshotChange, which: String) async throws {
        let path = change.location
        var m = try await QCOW2InPlace(file: change.file, path: path, setFileLength: change.setFileLength)
        let h = m.header
        let cs = m.cs
        let existing = try await readSnapshots(m.file, header: h, path: path)
        if h.hasDataFile { throw FerryError(.notSupported, "ferry cannot change snapshots of qcow2 images with an external data file", path: path) }
        // By name, as qemu-img 7.2 deletes.
        guard let victim = existing.firstIndex(where: { $0.name == which }) else {
            throw FerryError(.notFound, "Could not delete snapshot '\(which)': snapshot not found")
        }
        let sn = existing[victim]
        guard sn.l1Size >= 0, Int64(sn.l1Size) * 8 <= QCOW2Header.maxL1Bytes, sn.l1Size == 0 || (sn.l1Offset > 0 && sn.l1Offset % cs == 0) else {
            throw FerryError(.corrupt, "qcow2 snapshot '\(sn.name)' has an invalid L1 table", path: path, offset: sn.l1Offset)
        }
        // The old table, and the new one without the entry.
        let oldTableBytes = try await snapshotTableLength(m, header: h)
        var old = try await m.read(at: h.snapshotsOffset, count: Int(min(Int64(oldTableBytes), m.file.size - h.snapshotsOffset)))
        old += [UInt8](repeating: 0, count: oldTableBytes - old.count)
        var table: [UInt8] = []
        var pos = 0
        for i in 0 ..< existing.count {
            let b = BigEndianBytes(bytes: Array(old[pos ..< pos + 40]))
            let length = (40 + Int(b.u32(36)) + Int(b.u16(12)) + Int(b.u16(14)) + 7) / 8 * 8
            if i != victim { table += old[pos ..< pos + length] }
            pos += length
        }
        let raw = sn.l1Size > 0 ? try await m.read(at: sn.l1Offset, count: sn.l1Size * 8) : []
        let snapL1 = (0 ..< sn.l1Size).map { QCOW2InPlace.entry(raw, $0, bits: 64) }
        var newOffset: Int64 = 0
        if !table.isEmpty {
            newOffset = try await m.allocate(clusters: (Int64(table.count) + cs - 1) / cs)
            try await m.write(table, at: newOffset)
            try await m.flush()
        }
        var fields = [UInt8](repeating: 0, count: 12)
        QCOW2InPlace.setEntry(&fields, 0, bits: 32, UInt64(existing.count - 1))
        for k in 0 ..< 8 { fields[4 + k] = UInt8(truncatingIfNeeded: UInt64(newOffset) >> UInt64(56 - 8 * k)) }
        try await m.write(fields, at: 60)
        try await m.flush()

        // References dropped.
        var (counts, _) = try await references(m, l1: snapL1)
        if sn.l1Size > 0 {
            for c in sn.l1Offset / cs ..< (sn.l1Offset + Int64(sn.l1Size) * 8 + cs - 1) / cs { counts[c, default: 0] += 1 }
        }
        for c in h.snapshotsOffset / cs ..< (h.snapshotsOffset + Int64(oldTableBytes) + cs - 1) / cs { counts[c, default: 0] += 1 }
        try await m.adjust(counts: counts, by: -1)
        try await m.flush()

        try await restoreCopiedFlags(m)
    }

    /// Sets the COPIED flags of the active L1 and L2 tables where a cluster is referenced
    /// once (theirs alone) and clears them elsewhere.
    static func restoreCopiedFlags(_ m: QCOW2InPlace) async throws {
        let h = m.header, cs = m.cs
        let activeRaw = h.l1Size > 0 ? try await m.read(at: h.l1TableOffset, count: h.l1Size * 8) : []
        var l1 = (0 ..< h.l1Size).map { QCOW2InPlace.entry(activeRaw, $0, bits: 64) }
        let (_, tables) = try await references(m, l1: l1)
        var blocks: [Int64: [UInt8]] = [:]
        func refcount(_ c: Int64) async throws -> UInt64 {
            let index = c / m.perBlock
            if blocks[index] == nil {
                let offset = try m.blockOffset(index)
                blocks[index] = offset == 0 ? [UInt8](repeating: 0, count: Int(cs)) : try await m.read(at: offset, count: Int(cs))
            }
            return QCOW2InPlace.entry(blocks[index]!, Int(c - index * m.perBlock), bits: m.refcountBits)
        }
        let words = h.l2EntryBytes / 8
        for var t in tables {
            var changed = false
            for k in 0 ..< Int(cs) / h.l2EntryBytes {
                let e = QCOW2InPlace.entry(t.bytes, k * words, bits: 64)
                guard e & QCOW2InPlace.compressedBit == 0, e & QCOW2InPlace.offsetMask != 0 else { continue }
                let copied = try await refcount(Int64(e & QCOW2InPlace.offsetMask) / cs) == 1
                let want = copied ? e | QCOW2InPlace.copiedBit : e & ~QCOW2InPlace.copiedBit
                if want != e { QCOW2InPlace.setEntry(&t.bytes, k * words, bits: 64, want); changed = true }
            }
            if changed { try await m.write(t.bytes, at: t.offset) }
        }
        var l1Changed = false
        for i in l1.indices where l1[i] & QCOW2InPlace.offsetMask != 0 {
            let copied = try await refcount(Int64(l1[i] & QCOW2InPlace.offsetMask) / cs) == 1
            let want = copied ? l1[i] | QCOW2InPlace.copiedBit : l1[i] & ~QCOW2InPlace.copiedBit
            if want != l1[i] { l1[i] = want; l1Changed = true }
        }
        if l1Changed {
            var bytes = [UInt8](repeating: 0, count: h.l1Size * 8)
            for (i, e) in l1.enumerated() { QCOW2InPlace.setEntry(&bytes, i, bits: 64, e) }
            try await m.write(bytes, at: h.l1TableOffset)
        }
        try await m.flush()
    }

    /// Reverts the active layer to a snapshot (`snapshot -a`): the clusters the snapshot's
    /// L1 table reaches gain a reference, the active L1 table becomes a copy of it (and the
    /// size the snapshot's), then the clusters the old active tables reached lose one, and
    /// the COPIED flags are set again. A snapshot with a larger L1 table is refused.
    static func applySnapshot(_ change: SnapshotChange, which: String) async throws {
        let path = change.location
        let m = try await QCOW2InPlace(file: change.file, path: path, setFileLength: change.setFileLength)
        let h = m.header, cs = m.cs
        if h.hasDataFile { throw FerryError(.notSupported, "ferry cannot change snapshots of qcow2 images with an external data file", path: path) }
        if h.autoclear & QCOW2Header.bitmapsBit != 0, let b = h.bitmaps, b.count > 0 {
            throw FerryError(.notSupported, "ferry cannot apply snapshots of qcow2 images with persistent bitmaps yet", path: path)
        }
        let existing = try await readSnapshots(m.file, header: h, path: path)
        guard let sn = existing.first(where: { $0.id == which }) ?? existing.first(where: { $0.name == which }) else {
            throw FerryError(.notFound, "Could not apply snapshot '\(which)': Failed to load snapshot: No such file or directory")
        }
        guard sn.l1Size <= h.l1Size, sn.l1Size == 0 || (sn.l1Offset > 0 && sn.l1Offset % cs == 0) else {
            throw FerryError(.notSupported, "ferry cannot apply snapshot '\(sn.name)': its L1 table is larger than the image's (\(sn.l1Size) entries, not \(h.l1Size))", path: path)
        }
        let size = sn.diskSize ?? h.size
        guard size >= 0, size <= Int64(h.l1Size) * h.l2Coverage else {
            throw FerryError(.corrupt, "qcow2 snapshot '\(sn.name)' has size \(size), more than the L1 table covers", path: path)
        }
        let snapRaw = sn.l1Size > 0 ? try await m.read(at: sn.l1Offset, count: sn.l1Size * 8) : []
        var snapL1 = (0 ..< sn.l1Size).map { QCOW2InPlace.entry(snapRaw, $0, bits: 64) & ~QCOW2InPlace.copiedBit }
        snapL1 += [UInt64](repeating: 0, count: h.l1Size - sn.l1Size)
        let activeRaw = h.l1Size > 0 ? try await m.read(at: h.l1TableOffset, count: h.l1Size * 8) : []
        let activeL1 = (0 ..< h.l1Size).map { QCOW2InPlace.entry(activeRaw, $0, bits: 64) }
        let (gained, _) = try await references(m, l1: snapL1)
        let (lost, _) = try await references(m, l1: activeL1)
        try await m.adjust(counts: gained, by: 1)
        try await m.flush()
        var bytes = [UInt8](repeating: 0, count: h.l1Size * 8)
        for (i, e) in snapL1.enumerated() { QCOW2InPlace.setEntry(&bytes, i, bits: 64, e) }
        if !bytes.isEmpty { try await m.write(bytes, at: h.l1TableOffset) }
        if size != h.size {
            var field = [UInt8](repeating: 0, count: 8)
            QCOW2InPlace.setEntry(&field, 0, bits: 64, UInt64(size))
            try await m.write(field, at: 24)
        }
        try await m.flush()
        try await m.adjust(counts: lost, by: -1)
        try await m.flush()
        try await restoreCopiedFlags(m)
    }

    /// The bytes the snapshot table takes (entries walked as `readSnapshots` walks them).
    static func snapshotTableLength(_ m: QCOW2InPlace, header h: QCOW2Header) async throws -> Int {
        var pos = h.snapshotsOffset
        for i in 0 ..< Int(h.nbSnapshots) {
            guard pos >= 0, pos <= m.file.size - 40 else {
                throw FerryError(.corrupt, "qcow2 snapshot table entry \(i) lies past the end of the file", path: m.path, offset: pos)
            }
            let fixed = BigEndianBytes(bytes: try await m.read(at: pos, count: 40))
            let variable = Int(fixed.u32(36)) + Int(fixed.u16(12)) + Int(fixed.u16(14))
            guard variable <= 1024 + 2 * 65535 else {
                throw FerryError(.corrupt, "qcow2 snapshot table entry \(i) is invalid", path: m.path, offset: pos)
            }
            pos += Int64((40 + variable + 7) / 8 * 8)
        }
        return Int(pos - h.snapshotsOffset)
    }
}
