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
            throw FerryError(.notSupported, "ferry cannot shrink qcow2 images yet", path: path)
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
}
