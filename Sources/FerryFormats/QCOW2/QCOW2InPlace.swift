import FerryCore

/// Edits of an existing qcow2 image's metadata in place (resize and the like): its header,
/// refcount table and refcount blocks, read and checked against the file before use. New
/// clusters are taken at the end of the file; refcounts are raised before anything points
/// at them and lowered after nothing does, so a crash in between leaks clusters (which
/// `qemu-img check -r leaks` reclaims) but never corrupts the image.
struct QCOW2InPlace {
    let path: String
    private(set) var file: any BlockDevice
    let header: QCOW2Header
    let cs: Int64
    private(set) var reftable: [UInt64]
    let setFileLength: @Sendable (Int64) async throws -> any BlockDevice

    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let copiedBit: UInt64 = 1 << 63
    static let compressedBit: UInt64 = 1 << 62

    /// `checking`: opened to be checked (and repaired), so a dirty or corrupt mark is no reason to refuse.
    init(file: any BlockDevice, path: String, checking: Bool = false,
         setFileLength: @escaping @Sendable (Int64) async throws -> any BlockDevice) async throws {
        self.path = path
        self.file = file
        self.setFileLength = setFileLength
        let first = try await QCOW2Format.readBytes(file, at: 0, count: Int(min(file.size, 112)))
        var bytes = first
        if first.count >= 24 {
            let cb = BigEndianBytes(bytes: first).u32(20)
            if cb >= 9 && cb <= 21 { bytes = try await QCOW2Format.readBytes(file, at: 0, count: Int(min(file.size, Int64(1) << Int64(cb)))) }
        }
        let h = try QCOW2Header(bytes, fileSize: file.size, path: path)
        header = h
        cs = Int64(h.clusterSize)
        if h.dirty && !checking {
            throw FerryError(.notSupported, "qcow2 image is dirty (its refcounts are not up to date); run 'qemu-img check -r all' on it first", path: path)
        }
        if h.corrupt && !checking {
            throw FerryError(.corrupt, "qcow2 image is marked corrupt; run 'qemu-img check -r all' on it first", path: path)
        }
        if h.cryptMethod != 0 {
            throw FerryError(.notSupported, "encrypted qcow2 images cannot be changed by ferry", path: path)
        }
        let tableBytes = Int64(h.refcountTableClusters) * cs
        guard tableBytes > 0, tableBytes <= QCOW2Header.maxRefcountTableBytes, h.refcountTableOffset > 0,
              h.refcountTableOffset % cs == 0, h.refcountTableOffset <= file.size - tableBytes else {
            throw FerryError(.corrupt, "qcow2 refcount table (\(tableBytes) bytes) is invalid or lies past the end of the file", path: path, offset: h.refcountTableOffset)
        }
        let raw = BigEndianBytes(bytes: try await QCOW2Format.readBytes(file, at: h.refcountTableOffset, count: Int(tableBytes)))
        reftable = (0 ..< Int(tableBytes / 8)).map { raw.u64($0 * 8) & Self.offsetMask }
    }

    var refcountBits: Int { header.refcountBits }
    /// Clusters one refcount block covers.
    var perBlock: Int64 { cs * 8 / Int64(refcountBits) }
    var maxRefcount: UInt64 { refcountBits >= 64 ? .max : (UInt64(1) << UInt64(refcountBits)) - 1 }

    func read(at offset: Int64, count: Int) async throws -> [UInt8] {
        guard offset >= 0, count >= 0, offset <= file.size - Int64(count) else {
            throw FerryError(.corrupt, "qcow2 metadata at \(offset) (\(count) bytes) lies past the end of the file", path: path, offset: offset)
        }
        return try await QCOW2Format.readBytes(file, at: offset, count: count)
    }

    func write(_ bytes: [UInt8], at offset: Int64) async throws {
        let buffer = AlignedBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.mutableBytes.copyMemory(from: $0) }
        try await file.write(at: offset, from: buffer.bytes, flags: [])
    }

    func flush() async throws { try await file.flush() }

    /// Sets the file's length (the new part reads as zeros).
    mutating func setLength(_ length: Int64) async throws {
        file = try await setFileLength(length)
    }

    /// A refcount entry of a block's bytes: sub-byte widths from the lowest bits of each
    /// byte up, wider ones big-endian.
    static func entry(_ block: [UInt8], _ i: Int, bits: Int) -> UInt64 {
        if bits < 8 {
            let bit = i * bits
            return UInt64(block[bit / 8] >> UInt8(bit % 8)) & ((1 << UInt64(bits)) - 1)
        }
        let n = bits / 8
        return block[i * n ..< i * n + n].reduce(0) { $0 << 8 | UInt64($1) }
    }

    static func setEntry(_ block: inout [UInt8], _ i: Int, bits: Int, _ v: UInt64) {
        if bits < 8 {
            let bit = i * bits
            let mask = UInt8((1 << bits) - 1) << UInt8(bit % 8)
            block[bit / 8] = block[bit / 8] & ~mask | (UInt8(truncatingIfNeeded: v) << UInt8(bit % 8)) & mask
            return
        }
        let n = bits / 8
        for k in 0 ..< n { block[i * n + k] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - k))) }
    }

    /// The offset of refcount block `index`, checked, or 0 if there is none.
    func blockOffset(_ index: Int64) throws -> Int64 {
        guard index < Int64(reftable.count) else { return 0 }
        let o = Int64(reftable[Int(index)])
        guard o == 0 || (o % cs == 0 && o <= file.size - cs) else {
            throw FerryError(.corrupt, "qcow2 refcount block \(index) at \(o) is invalid or lies past the end of the file", path: path, offset: o)
        }
        return o
    }

    /// Adds `delta` (+1 or -1) to the refcount of clusters `first ..< first + count`, every
    /// one of which must be covered by a refcount block already.
    func adjust(clusters first: Int64, count: Int64, by delta: Int) async throws {
        var c = first
        while c < first + count {
            let index = c / perBlock
            let offset = try blockOffset(index)
            guard offset != 0 else {
                throw FerryError(.corrupt, "qcow2 cluster \(c) has no refcount block", path: path, offset: c * cs)
            }
            var block = try await read(at: offset, count: Int(cs))
            let stop = min(first + count, (index + 1) * perBlock)
            while c < stop {
                let i = Int(c - index * perBlock)
                let v = Self.entry(block, i, bits: refcountBits)
                guard delta > 0 ? v < maxRefcount : v > 0 else {
                    throw FerryError(.corrupt, "qcow2 refcount of cluster \(c) is \(v), which cannot be \(delta > 0 ? "raised" : "lowered")", path: path, offset: c * cs)
                }
                Self.setEntry(&block, i, bits: refcountBits, delta > 0 ? v + 1 : v - 1)
                c += 1
            }
            try await write(block, at: offset)
        }
    }

    /// Adds `delta` times each count to the refcounts of the clusters in `counts`, a refcount
    /// block read and written once for all of its clusters.
    func adjust(counts: [Int64: Int], by delta: Int) async throws {
        var byBlock: [Int64: [(Int64, Int)]] = [:]
        for (c, n) in counts { byBlock[c / perBlock, default: []].append((c, n)) }
        for index in byBlock.keys.sorted() {
            let offset = try blockOffset(index)
            guard offset != 0 else {
                throw FerryError(.corrupt, "qcow2 cluster \(index * perBlock) has no refcount block", path: path, offset: index * perBlock * cs)
            }
            var block = try await read(at: offset, count: Int(cs))
            for (c, n) in byBlock[index]! {
                let i = Int(c - index * perBlock)
                let v = Self.entry(block, i, bits: refcountBits)
                let change = UInt64(n)
                guard delta > 0 ? (v > 0 && maxRefcount - v >= change) : v >= change else {
                    throw FerryError(.corrupt, "qcow2 refcount of cluster \(c) is \(v), which cannot change by \(delta * n)", path: path, offset: c * cs)
                }
                Self.setEntry(&block, i, bits: refcountBits, delta > 0 ? v + change : v - change)
            }
            try await write(block, at: offset)
        }
    }

    /// Counts the host clusters an L2 table's entries reference into `counts`: a plain or
    /// zero-allocated entry its cluster, a compressed one every cluster its sectors touch.
    func countReferences(of table: [UInt8], into counts: inout [Int64: Int]) {
        let words = header.l2EntryBytes / 8
        let sizeBits = UInt64(header.clusterBits - 8)
        let offsetBits = 62 - sizeBits
        for k in 0 ..< Int(cs) / header.l2EntryBytes {
            let e = Self.entry(table, k * words, bits: 64)
            if e & Self.compressedBit != 0 {
                let start = Int64(e & ((1 << offsetBits) - 1)) & ~511
                let sectors = Int64((e >> offsetBits) & ((1 << sizeBits) - 1)) + 1
                for c in start / cs ... (start + sectors * 512 - 1) / cs { counts[c, default: 0] += 1 }
            } else if e & Self.offsetMask != 0 {
                counts[Int64(e & Self.offsetMask) / cs, default: 0] += 1
            }
        }
    }

    /// Takes `count` new clusters at the end of the file (after any refcount blocks they
    /// need, made in free entries of the refcount table), with refcount 1, and returns the
    /// offset of the first. The file is grown to hold them; they read as zeros.
    mutating func allocate(clusters count: Int64) async throws -> Int64 {
        let end = (file.size + cs - 1) / cs
        // New refcount blocks go first; find how many the new clusters and they need.
        var newBlocks: [Int64] = []
        while true {
            let last = end + Int64(newBlocks.count) + count - 1
            var missing: [Int64] = []
            for index in end / perBlock ... last / perBlock where try blockOffset(index) == 0 { missing.append(index) }
            if missing.count == newBlocks.count { break }
            newBlocks = missing
        }
        if let over = newBlocks.first(where: { $0 >= Int64(reftable.count) }) {
            throw FerryError(.notSupported, "growing this qcow2 image needs a larger refcount table (for refcount block \(over)), which ferry cannot make yet", path: path)
        }
        let start = end + Int64(newBlocks.count)
        file = try await setFileLength((start + count) * cs)
        // The new blocks count themselves and the new clusters in their ranges.
        for (k, index) in newBlocks.enumerated() {
            var block = [UInt8](repeating: 0, count: Int(cs))
            for c in max(end, index * perBlock) ..< min(start + count, (index + 1) * perBlock) {
                Self.setEntry(&block, Int(c - index * perBlock), bits: refcountBits, 1)
            }
            try await write(block, at: (end + Int64(k)) * cs)
        }
        // Clusters (new blocks among them) in blocks that exist already.
        var c = end
        while c < start + count {
            let index = c / perBlock
            let stop = min(start + count, (index + 1) * perBlock)
            if !newBlocks.contains(index) { try await adjust(clusters: c, count: stop - c, by: 1) }
            c = stop
        }
        try await flush()
        for (k, index) in newBlocks.enumerated() {
            let offset = UInt64((end + Int64(k)) * cs)
            var entry = [UInt8](repeating: 0, count: 8)
            Self.setEntry(&entry, 0, bits: 64, offset)
            try await write(entry, at: header.refcountTableOffset + index * 8)
            reftable[Int(index)] = offset
        }
        try await flush()
        return start * cs
    }
}
