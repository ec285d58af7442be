import FerryCore

extension QCOW2Format {
    /// Writes whole clusters into the image's active layer where it had none: one run of new
    /// clusters at the end of the file (the L2 tables it lacks, then the data), the data
    /// written several clusters at a time, then the L2 entries, then the L1 entries, each
    /// step flushed before the next points at it. Images with snapshots, extended L2 entries
    /// or an external data file are refused.
    public static func fillLayer(_ fill: LayerFill) async throws {
        let path = fill.location
        var m = try await QCOW2InPlace(file: fill.file, path: path, setFileLength: fill.setFileLength)
        let h = m.header
        if h.nbSnapshots > 0 { throw FerryError(.notSupported, "ferry cannot rebase qcow2 images with internal snapshots safely yet (only with -u)", path: path) }
        if h.extendedL2 { throw FerryError(.notSupported, "ferry cannot rebase qcow2 images with extended L2 entries safely yet (only with -u)", path: path) }
        if h.hasDataFile { throw FerryError(.notSupported, "ferry cannot rebase qcow2 images with an external data file safely yet (only with -u)", path: path) }
        guard !fill.clusters.isEmpty else { return }
        let cs = m.cs
        let coverage = h.l2Coverage
        let raw = h.l1Size > 0 ? try await m.read(at: h.l1TableOffset, count: h.l1Size * 8) : []
        var l1 = (0 ..< h.l1Size).map { QCOW2InPlace.entry(raw, $0, bits: 64) }
        var newTables: [Int] = []
        for c in fill.clusters {
            guard c >= 0, c % cs == 0, c < h.size else {
                throw FerryError(.invalidArgument, "cluster at \(c) is not a whole cluster of the image", path: path, offset: c)
            }
            let i = Int(c / coverage)
            guard i < l1.count else { throw FerryError(.corrupt, "qcow2 L1 table does not cover offset \(c)", path: path, offset: c) }
            if l1[i] & QCOW2InPlace.offsetMask == 0, newTables.last != i { newTables.append(i) }
        }
        let base = try await m.allocate(clusters: Int64(newTables.count + fill.clusters.count))
        let dataBase = base + Int64(newTables.count) * cs
        let file = m.file

        // The data, 16 clusters in flight.
        let clusters = fill.clusters
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func add() {
                let j = next
                next += 1
                group.addTask {
                    let buffer = AlignedBuffer(count: Int(cs))
                    try await fill.read(clusters[j], buffer.mutableBytes)
                    try await file.write(at: dataBase + Int64(j) * cs, from: buffer.bytes, flags: [])
                }
            }
            while next < min(16, clusters.count) { add() }
            while try await group.next() != nil {
                if next < clusters.count { add() }
            }
        }
        try await m.flush()

        // The L2 entries, a table at a time.
        var j = 0
        while j < clusters.count {
            let i = Int(clusters[j] / coverage)
            let existing = Int64(l1[i] & QCOW2InPlace.offsetMask)
            let tableOffset: Int64
            var table: [UInt8]
            if existing != 0 {
                guard existing % cs == 0 else { throw FerryError(.corrupt, "qcow2 L2 table \(i) at \(existing) is not cluster aligned", path: path, offset: existing) }
                tableOffset = existing
                table = try await m.read(at: existing, count: Int(cs))
            } else {
                guard let k = newTables.firstIndex(of: i) else { throw FerryError(.corrupt, "qcow2 L2 table \(i) is missing", path: path) }
                tableOffset = base + Int64(k) * cs
                table = [UInt8](repeating: 0, count: Int(cs))
            }
            while j < clusters.count && Int(clusters[j] / coverage) == i {
                let index = Int(clusters[j] % coverage / cs)
                guard QCOW2InPlace.entry(table, index, bits: 64) == 0 else {
                    throw FerryError(.corrupt, "qcow2 cluster at guest offset \(clusters[j]) is allocated already", path: path, offset: clusters[j])
                }
                QCOW2InPlace.setEntry(&table, index, bits: 64, UInt64(dataBase + Int64(j) * cs) | QCOW2InPlace.copiedBit)
                j += 1
            }
            try await m.write(table, at: tableOffset)
        }
        try await m.flush()
        for (k, i) in newTables.enumerated() {
            l1[i] = UInt64(base + Int64(k) * cs) | QCOW2InPlace.copiedBit
            var entry = [UInt8](repeating: 0, count: 8)
            QCOW2InPlace.setEntry(&entry, 0, bits: 64, l1[i])
            try await m.write(entry, at: h.l1TableOffset + Int64(i) * 8)
        }
        try await m.flush()
    }
}
