import FerryCore

extension QCOW2Format {
    /// `amend -o refcount_bits=N`: the refcounts of every cluster of the file, read from the
    /// present structures, written again `bits` wide in new refcount blocks and a new table
    /// after the end of the file. Nothing points at them until the caller writes the header
    /// (a crash before leaves the image as it was); the old structures are free after.
    /// A refcount too large for the new width is refused before anything is written.
    static func rebuildRefcounts(_ m: inout QCOW2InPlace, bits: Int) async throws -> (tableOffset: Int64, tableClusters: Int) {
        let cs = m.cs
        let start = (m.file.size + cs - 1) / cs
        var counts = [UInt64](repeating: 0, count: Int(start))
        var old: [Int64] = []
        for index in 0 ..< Int64(m.reftable.count) {
            let offset = try m.blockOffset(index)
            guard offset != 0 else { continue }
            old.append(offset / cs)
            let block = try await m.read(at: offset, count: Int(cs))
            for i in 0 ..< max(0, min(m.perBlock, start - index * m.perBlock)) {
                counts[Int(index * m.perBlock + i)] = QCOW2InPlace.entry(block, Int(i), bits: m.refcountBits)
            }
        }
        let oldTable = m.header.refcountTableOffset / cs
        old += (oldTable ..< oldTable + Int64(m.header.refcountTableClusters))
        for c in old where c < start { counts[Int(c)] = 0 }

        // New blocks for every cluster up to the end of the new table, which follows them.
        let perBlock = cs * 8 / Int64(bits)
        var blocks: Int64 = 0, table: Int64 = 0
        while true {
            let b = (start + blocks + table + perBlock - 1) / perBlock
            let t = (b * 8 + cs - 1) / cs
            if b == blocks && t == table { break }
            (blocks, table) = (b, t)
        }
        guard table * cs <= QCOW2Header.maxRefcountTableBytes else {
            throw FerryError(.notSupported, "a refcount table for \(bits)-bit refcounts of this image would be too large", path: m.path)
        }
        counts += [UInt64](repeating: 1, count: Int(blocks + table))
        let maxRefcount: UInt64 = bits >= 64 ? .max : (1 << UInt64(bits)) - 1
        if let c = counts.firstIndex(where: { $0 > maxRefcount }) {
            throw FerryError(.invalidArgument, "Cannot decrease refcount entry width to \(bits) bits: Cluster at offset 0x\(String(Int64(c) * cs, radix: 16)) has a refcount of \(counts[c])",
                             path: m.path)
        }
        // The blocks are contiguous, so each cluster's entry is at its index in all of them.
        var blockBytes = [UInt8](repeating: 0, count: Int(blocks * cs))
        for (c, v) in counts.enumerated() where v != 0 { QCOW2InPlace.setEntry(&blockBytes, c, bits: bits, v) }
        var tableBytes = [UInt8](repeating: 0, count: Int(table * cs))
        for k in 0 ..< Int(blocks) { QCOW2HeaderWriter.put64(&tableBytes, k * 8, UInt64((start + Int64(k)) * cs)) }
        try await m.setLength((start + blocks + table) * cs)
        try await m.write(blockBytes, at: start * cs)
        try await m.write(tableBytes, at: (start + blocks) * cs)
        try await m.flush()
        return ((start + blocks) * cs, Int(table))
    }
}
