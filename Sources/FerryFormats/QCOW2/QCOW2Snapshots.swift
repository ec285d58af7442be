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
        var counts: [Int64: Int] = [:]
        var tables: [(offset: Int64, bytes: [UInt8])] = []
        let entryWords = h.l2EntryBytes / 8
        let sizeBits = UInt64(h.clusterBits - 8)
        let offsetBits = 62 - sizeBits
        for i in 0 ..< l1.count {
            let l2 = Int64(l1[i] & QCOW2InPlace.offsetMask)
            guard l2 != 0 else { continue }
            guard l2 % cs == 0 else { throw FerryError(.corrupt, "qcow2 L2 table \(i) at \(l2) is not cluster aligned", path: path, offset: l2) }
            counts[l2 / cs, default: 0] += 1
            var table = try await m.read(at: l2, count: Int(cs))
            for k in 0 ..< Int(cs) / h.l2EntryBytes {
                let e = QCOW2InPlace.entry(table, k * entryWords, bits: 64)
                if e & QCOW2InPlace.compressedBit != 0 {
                    let start = Int64(e & ((1 << offsetBits) - 1)) & ~511
                    let sectors = Int64((e >> offsetBits) & ((1 << sizeBits) - 1)) + 1
                    for c in start / cs ... (start + sectors * 512 - 1) / cs { counts[c, default: 0] += 1 }
                } else if e & QCOW2InPlace.offsetMask != 0 {
                    counts[Int64(e & QCOW2InPlace.offsetMask) / cs, default: 0] += 1
                }
                if e & QCOW2InPlace.copiedBit != 0 {
                    QCOW2InPlace.setEntry(&table, k * entryWords, bits: 64, e & ~QCOW2InPlace.copiedBit)
                }
            }
            tables.append((l2, table))
            l1[i] &= ~QCOW2InPlace.copiedBit
        }
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
        let idBytes = Array(id.utf8), nameBytes = Array(change.create.utf8)
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
