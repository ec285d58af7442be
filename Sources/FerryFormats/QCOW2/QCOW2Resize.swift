import FerryCore

extension QCOW2Format {
    public static var resizable: Bool { true }

    /// Grows the image: a new size in the header, and where the L1 table no longer covers it,
    /// a larger L1 table in new clusters (the old one is freed after the header points at
    /// the new one). Shrinking, preallocation, external data files and persistent bitmaps
    /// are refused.
    public static func resize(_ request: ResizeRequest) async throws {
        let path = request.location
        guard request.size <= Int64(1) << 62 else {
            throw FerryError(.invalidArgument, "Failed to grow the L1 table: File too large")
        }
        guard request.size % 512 == 0 else {
            throw FerryError(.invalidArgument, "The new size must be a multiple of 512")
        }
        guard request.preallocation == "off" else {
            throw FerryError(.notSupported, "ferry resizes qcow2 images only with --preallocation=off", path: path)
        }
        var m = try await QCOW2InPlace(file: request.file, path: path, setFileLength: request.setFileLength)
        let h = m.header
        if h.hasDataFile {
            throw FerryError(.notSupported, "ferry cannot resize qcow2 images with an external data file yet", path: path)
        }
        if h.autoclear & QCOW2Header.bitmapsBit != 0, let b = h.bitmaps, b.count > 0 {
            throw FerryError(.notSupported, "ferry cannot resize qcow2 images with persistent bitmaps yet", path: path)
        }
        if h.version < 3 && h.nbSnapshots > 0 {
            throw FerryError(.notSupported, "Can't resize a v2 image which has snapshots")
        }
        if request.size < h.size {
            return try await shrink(m, to: request.size)
        }
        let needed = (request.size + h.l2Coverage - 1) / h.l2Coverage
        var sizeField = [UInt8](repeating: 0, count: 8)
        QCOW2InPlace.setEntry(&sizeField, 0, bits: 64, UInt64(request.size))
        guard needed > Int64(h.l1Size) else {
            try await m.write(sizeField, at: 24)
            try await m.flush()
            return
        }
        guard needed * 8 <= QCOW2Header.maxL1Bytes else {
            throw FerryError(.invalidArgument, "Failed to grow the L1 table: File too large")
        }
        let oldBytes = h.l1Size * 8
        var l1 = h.l1Size > 0 ? try await m.read(at: h.l1TableOffset, count: oldBytes) : []
        guard h.l1Size == 0 || h.l1TableOffset % m.cs == 0 else {
            throw FerryError(.corrupt, "qcow2 L1 table offset \(h.l1TableOffset) is not cluster aligned", path: path, offset: 40)
        }
        let clusters = (needed * 8 + m.cs - 1) / m.cs
        l1 += [UInt8](repeating: 0, count: Int(clusters * m.cs) - oldBytes)
        let offset = try await m.allocate(clusters: clusters)
        try await m.write(l1, at: offset)
        try await m.flush()
        // size, crypt_method, l1_size, l1_table_offset: one write.
        var fields = sizeField + [UInt8](repeating: 0, count: 16)
        QCOW2InPlace.setEntry(&fields, 2, bits: 32, UInt64(h.cryptMethod))
        QCOW2InPlace.setEntry(&fields, 3, bits: 32, UInt64(needed))
        QCOW2InPlace.setEntry(&fields, 2, bits: 64, UInt64(offset))
        try await m.write(fields, at: 24)
        try await m.flush()
        if h.l1Size > 0 {
            try await m.adjust(clusters: h.l1TableOffset / m.cs, count: (Int64(oldBytes) + m.cs - 1) / m.cs, by: -1)
            try await m.flush()
        }
    }

    /// Shrinks the image (the caller has been given --shrink): the new size in the header
    /// first, then every L2 entry past the last cluster the new size touches cleared (and L2
    /// tables wholly past it dropped from the L1 table), then the clusters they referenced
    /// lose that reference. Images with snapshots are refused (their tables may be shared).
    static func shrink(_ m: QCOW2InPlace, to size: Int64) async throws {
        let h = m.header, cs = m.cs, path = m.path
        if h.nbSnapshots > 0 {
            throw FerryError(.notSupported, "ferry cannot shrink qcow2 images with internal snapshots yet", path: path)
        }
        if h.extendedL2 {
            throw FerryError(.notSupported, "ferry cannot shrink qcow2 images with extended L2 entries yet", path: path)
        }
        var field = [UInt8](repeating: 0, count: 8)
        QCOW2InPlace.setEntry(&field, 0, bits: 64, UInt64(size))
        try await m.write(field, at: 24)
        try await m.flush()

        let keep = (size + cs - 1) / cs * cs // guest bytes whose clusters stay
        let coverage = h.l2Coverage
        let raw = h.l1Size > 0 ? try await m.read(at: h.l1TableOffset, count: h.l1Size * 8) : []
        var l1 = (0 ..< h.l1Size).map { QCOW2InPlace.entry(raw, $0, bits: 64) }
        var dropped: [UInt64] = [] // L1 entries of whole tables dropped
        var cleared: [(Int, [UInt8])] = [] // tables of the entries cleared, as they were
        for i in l1.indices where Int64(i + 1) * coverage > keep && l1[i] & QCOW2InPlace.offsetMask != 0 {
            let l2 = Int64(l1[i] & QCOW2InPlace.offsetMask)
            guard l2 % cs == 0 else { throw FerryError(.corrupt, "qcow2 L2 table \(i) at \(l2) is not cluster aligned", path: path, offset: l2) }
            var table = try await m.read(at: l2, count: Int(cs))
            if Int64(i) * coverage >= keep {
                dropped.append(l1[i])
                l1[i] = 0
                cleared.append((i, table))
                continue
            }
            let first = Int((keep - Int64(i) * coverage) / cs)
            var old = [UInt8](repeating: 0, count: Int(cs))
            for k in first ..< Int(cs) / 8 {
                QCOW2InPlace.setEntry(&old, k, bits: 64, QCOW2InPlace.entry(table, k, bits: 64))
                QCOW2InPlace.setEntry(&table, k, bits: 64, 0)
            }
            try await m.write(table, at: l2)
            cleared.append((i, old))
        }
        var bytes = [UInt8](repeating: 0, count: h.l1Size * 8)
        for (i, e) in l1.enumerated() { QCOW2InPlace.setEntry(&bytes, i, bits: 64, e) }
        if !bytes.isEmpty { try await m.write(bytes, at: h.l1TableOffset) }
        try await m.flush()

        // The references the cleared entries and dropped tables held.
        var counts: [Int64: Int] = [:]
        for (_, table) in cleared { m.countReferences(of: table, into: &counts) }
        for e in dropped { counts[Int64(e & QCOW2InPlace.offsetMask) / cs, default: 0] += 1 }
        try await m.adjust(counts: counts, by: -1)
        try await m.flush()
    }
}
