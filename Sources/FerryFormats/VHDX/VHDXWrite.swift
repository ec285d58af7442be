import FerryCore

/// `-o` options of a new VHDX image, as qemu-img takes them.
struct VHDXCreateOptions: Sendable {
    var fixed = false
    /// 0: chosen from the size, as qemu-img does.
    var blockSize: Int64 = 0
    var logSize: Int64 = 1 << 20
    var blockStateZero = true

    static func bad(_ what: String) -> FerryError { FerryError(.invalidArgument, "vhdx: " + what) }

    init(_ options: [String: String]) throws {
        if let s = options["subformat"] {
            guard VHDXFormat.subformats.contains(s) else {
                throw Self.bad("invalid subformat '\(s)' (allowed: \(VHDXFormat.subformats.joined(separator: ", ")))")
            }
            fixed = s == "fixed"
        }
        if let b = options["block_size"] {
            guard let v = ByteSize.parse(b), v == 0 || (v >= 1 << 20 && v <= 256 << 20 && v & (v - 1) == 0) else {
                throw Self.bad("invalid block_size '\(b)' (a power of two from 1M to 256M, or 0 to choose from the size)")
            }
            blockSize = v
        }
        if let l = options["log_size"] {
            guard let v = ByteSize.parse(l), v >= 1 << 20, v <= 256 << 20, v % (1 << 20) == 0 else {
                throw Self.bad("invalid log_size '\(l)' (a multiple of 1M, from 1M to 256M)")
            }
            logSize = v
        }
        if let z = options["block_state_zero"] {
            switch z {
            case "on": blockStateZero = true
            case "off": blockStateZero = false
            default: throw Self.bad("invalid block_state_zero '\(z)' (on or off)")
            }
        }
    }

    /// qemu-img's choice for block_size=0.
    func blockSize(for size: Int64) -> Int64 {
        if blockSize != 0 { return blockSize }
        if size > 32 << 40 { return 64 << 20 }
        if size > 100 << 30 { return 32 << 20 }
        if size > 1 << 30 { return 16 << 20 }
        return 8 << 20
    }
}

/// Where everything of a new image goes: headers and region tables in the first MiB, the
/// log (never written: its GUID in the headers is zero, so it is empty), the BAT, the metadata
/// region, then payload blocks.
struct VHDXNewLayout: Sendable {
    let size: Int64
    let blockSize: Int64
    let logOffset: Int64
    let logSize: Int64
    let batOffset: Int64
    let batLength: Int64
    let metadataOffset: Int64
    let dataOffset: Int64
    static let sector: Int64 = 512
    static let physicalSector: Int64 = 4096

    init(size: Int64, options o: VHDXCreateOptions) {
        self.size = size
        blockSize = o.blockSize(for: size)
        logOffset = VHDXLayout.mib
        logSize = o.logSize
        batOffset = logOffset + logSize
        let mib = VHDXLayout.mib
        let blocks = (size + blockSize - 1) / blockSize
        let ratio = (Int64(1) << 23) * Self.sector / blockSize
        let entries = blocks == 0 ? 0 : blocks + (blocks - 1) / ratio
        batLength = max(mib, (entries * 8 + mib - 1) / mib * mib)
        metadataOffset = batOffset + batLength
        dataOffset = metadataOffset + mib
    }

    var chunkRatio: Int64 { (Int64(1) << 23) * Self.sector / blockSize }
    var blocks: Int64 { (size + blockSize - 1) / blockSize }
    var entries: Int64 { blocks == 0 ? 0 : blocks + (blocks - 1) / chunkRatio }
    func batIndex(_ block: Int64) -> Int64 { block + block / chunkRatio }
}

/// Writes new VHDX images: `VHDXNewImage`.
enum VHDXWriter {
    static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        let o = try VHDXCreateOptions(options)
        try checkSize(size)
        let l = VHDXNewLayout(size: size, options: o)
        // Dynamic: every block once (sparse, cut to what is used at the end).
        return l.dataOffset + l.blocks * l.blockSize
    }

    static func checkSize(_ size: Int64) throws {
        guard size > 0, size <= Int64(VHDXLayout.maxVirtualSize), size % VHDXNewLayout.sector == 0 else {
            throw FerryError(.invalidArgument, "vhdx: invalid size \(size) (a multiple of 512 bytes, up to 64 TiB)")
        }
    }

    static func create(file: any BlockDevice, size: Int64, options: [String: String],
                       context: CreateContext) async throws -> any BlockDevice {
        let o = try VHDXCreateOptions(options)
        try checkSize(size)
        let layout = VHDXNewLayout(size: size, options: o)
        guard file.size >= layout.dataOffset + (o.fixed ? layout.blocks * layout.blockSize : 0) else {
            throw FerryError(.tooSmall, "the target (\(file.size) bytes) is too small for a vhdx image of \(size) bytes", path: context.location)
        }
        let image = VHDXNewImage(name: context.location, file: file, layout: layout, options: o)
        // Zeros over the identifier and headers: not a VHDX image until commit.
        try await image.writeZeroed(at: 0, count: Int(VHDXLayout.mib))
        return image
    }
}

/// A new dynamic or fixed VHDX image being written.
///
/// Payload blocks are taken by a bump allocator (dynamic) or all laid out at creation
/// (fixed), and written in place by as many writers as the engine runs, in parallel; the lock
/// covers only the BAT in memory, never I/O. The BAT, the metadata, the region tables, the
/// headers and the file identifier are written at `commit`, the identifier and headers last:
/// until then the first MiB is zeros, so an interrupted copy never looks like a VHDX image.
final class VHDXNewImage: CommittingDevice, @unchecked Sendable {
    let name: String
    let size: Int64
    let file: any BlockDevice
    let layout: VHDXNewLayout
    let opts: VHDXCreateOptions

    struct State {
        /// Host offset of each block's payload, 0 when unallocated.
        var blocks: [Int64]
        var next: Int64
        var markerOnDisk = true
        var changed = true
        var used: Int64 = 0
    }
    private let state: Locked<State>

    init(name: String, file: any BlockDevice, layout: VHDXNewLayout, options: VHDXCreateOptions) {
        self.name = name
        self.file = file
        self.layout = layout
        self.opts = options
        self.size = layout.size
        let n = Int(layout.blocks)
        let blocks = options.fixed ? (0 ..< n).map { layout.dataOffset + Int64($0) * layout.blockSize } : [Int64](repeating: 0, count: n)
        state = Locked(State(blocks: blocks, next: layout.dataOffset + (options.fixed ? Int64(n) * layout.blockSize : 0)))
    }

    var limits: BlockLimits {
        BlockLimits(alignment: max(file.limits.alignment, Int(VHDXNewLayout.sector)), preferredTransfer: 1 << 20, maximumTransfer: 32 << 20)
    }

    /// A fixed image's blocks are present from the start and hold what the file held: they
    /// read as zeros only if the file does (not an existing device or export).
    var capabilities: BlockCapabilities {
        opts.fixed && !file.capabilities.contains(.zeroInit) ? [.write, .flush] : [.write, .flush, .zeroInit]
    }

    var usedFileSize: Int64 { state.withLock { $0.used } }

    func writeZeroed(at offset: Int64, count: Int) async throws {
        let b = AlignedBuffer(count: count)
        b.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        try await file.write(at: offset, from: b.bytes, flags: [])
    }

    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            s.changed = true
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await writeZeroed(at: 0, count: (64 << 10) * 5) }
    }

    /// Host runs for `offset ..< offset + length`, allocating blocks when `allocate`.
    private func plan(_ offset: Int64, _ length: Int64, allocate: Bool) throws -> [(host: Int64, from: Int, count: Int)] {
        let bs = layout.blockSize
        return try state.withLock { s in
            var runs: [(host: Int64, from: Int, count: Int)] = []
            var pos = offset
            let end = offset + length
            while pos < end {
                let b = Int(pos / bs)
                let n = min(end, (pos / bs + 1) * bs) - pos
                var host = s.blocks[b]
                if host == 0 && allocate {
                    guard s.next + bs <= file.size else {
                        throw FerryError(.noSpace, "vhdx image file (\(file.size) bytes) has no room for another block", path: name, offset: pos)
                    }
                    host = s.next
                    s.next += bs
                    s.blocks[b] = host
                }
                if host != 0 {
                    let h = host + pos % bs
                    let from = Int(pos - offset)
                    appendJoining(&runs, host: h, from: from, count: Int(n))
                }
                pos += n
            }
            return runs
        }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { return }
        try await beginChange()
        let max = file.limits.maximumTransfer
        for r in try plan(offset, Int64(buffer.count), allocate: true) {
            var done = 0
            while done < r.count {
                let n = min(max, r.count - done)
                try await file.write(at: r.host + Int64(done), from: UnsafeRawBufferPointer(rebasing: buffer[r.from + done ..< r.from + done + n]), flags: [])
                done += n
            }
        }
        if flags.contains(.fua) { try await flush() }
    }

    /// An unallocated block already reads as zeros; an allocated one has its bytes zeroed.
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        try await beginChange()
        for r in try plan(offset, length, allocate: false) {
            try await file.writeZeroes(at: r.host, length: Int64(r.count), flags: [])
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let bs = layout.blockSize
        var pos = offset
        let end = offset + Int64(buffer.count)
        while pos < end {
            let n = min(end, (pos / bs + 1) * bs) - pos
            let host = state.withLock { $0.blocks[Int(pos / bs)] }
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(pos - offset + n)])
            if host != 0 { try await readHost(file, at: host + pos % bs, into: dst) } else { dst.initializeMemory(as: UInt8.self, repeating: 0) }
            pos += n
        }
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func flush() async throws { try await commit(durable: true) }

    // MARK: - commit

    func commit(durable: Bool) async throws {
        let (blocks, next, changed) = state.withLock { s in (s.blocks, s.next, s.changed) }
        guard changed else {
            if durable { try await file.flush() }
            return
        }
        let l = layout
        // BAT: payload entries; sector bitmap entries stay 0 (no parent).
        let bat = AlignedBuffer(count: Int(l.batLength))
        bat.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        let absent: UInt64 = opts.blockStateZero ? VHDXLayout.zero : VHDXLayout.notPresent
        for (b, host) in blocks.enumerated() {
            let entry = host != 0 ? UInt64(host / VHDXLayout.mib) << 20 | VHDXLayout.fullyPresent : absent
            bat.mutableBytes.storeBytes(of: entry.littleEndian, toByteOffset: Int(l.batIndex(Int64(b))) * 8, as: UInt64.self)
        }
        try await file.write(at: l.batOffset, from: bat.bytes, flags: [])
        try await writeStructure(metadata(), at: l.metadataOffset, count: Int(VHDXLayout.mib))
        let region = regionTable()
        for at in VHDXLayout.regionTableOffsets { try await writeStructure(region, at: at, count: VHDXLayout.regionTableBytes) }
        if durable { try await file.flush() }
        // Headers and the identifier last.
        let fileWrite = VHDXNewImage.newGUID(), dataWrite = VHDXNewImage.newGUID()
        for (k, at) in VHDXLayout.headerOffsets.enumerated() {
            try await writeStructure(header(sequence: UInt64(k + 1), fileWrite: fileWrite, dataWrite: dataWrite), at: at, count: VHDXLayout.headerBytes)
        }
        var ident = Array("vhdxfile".utf8)
        ident += "ferry".utf16.flatMap { [UInt8(truncatingIfNeeded: $0), UInt8(truncatingIfNeeded: $0 >> 8)] }
        try await writeStructure(ident, at: 0, count: 64 << 10)
        if durable { try await file.flush() }
        state.withLock { s in
            s.markerOnDisk = false
            s.used = next
            if s.blocks == blocks { s.changed = false }
        }
    }

    private func writeStructure(_ bytes: [UInt8], at offset: Int64, count: Int) async throws {
        let b = AlignedBuffer(count: count)
        b.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        bytes.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: b.mutableBytes[0 ..< bytes.count]).copyMemory(from: $0) }
        try await file.write(at: offset, from: b.bytes, flags: [])
    }

    static func newGUID() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        var b = (0 ..< 16).map { _ in UInt8.random(in: 0 ... 255, using: &g) }
        b[7] = b[7] & 0x0f | 0x40   // version 4 (the fourth group's first byte, stored little-endian)
        b[8] = b[8] & 0x3f | 0x80
        return b
    }

    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0 ..< n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    /// Sets the CRC-32C of a structure (its field at 4) over `count` bytes.
    static func sealed(_ bytes: [UInt8], count: Int) -> [UInt8] {
        var b = bytes + [UInt8](repeating: 0, count: count - bytes.count)
        let sum = VHDXCRC.checksum(b)
        for i in 0 ..< 4 { b[4 + i] = UInt8(truncatingIfNeeded: sum >> (8 * UInt32(i))) }
        return b
    }

    func header(sequence: UInt64, fileWrite: [UInt8], dataWrite: [UInt8]) -> [UInt8] {
        var h = Array("head".utf8) + [0, 0, 0, 0] + Self.le(sequence, 8) + fileWrite + dataWrite
        h += [UInt8](repeating: 0, count: 16)                              // LogGuid: the log is empty
        h += Self.le(0, 2) + Self.le(1, 2) + Self.le(UInt64(layout.logSize), 4) + Self.le(UInt64(layout.logOffset), 8)
        return Self.sealed(h, count: VHDXLayout.headerBytes)
    }

    func regionTable() -> [UInt8] {
        var r = Array("regi".utf8) + [0, 0, 0, 0] + Self.le(2, 4) + Self.le(0, 4)
        r += VHDXLayout.batRegion.bytes + Self.le(UInt64(layout.batOffset), 8) + Self.le(UInt64(layout.batLength), 4) + Self.le(1, 4)
        r += VHDXLayout.metadataRegion.bytes + Self.le(UInt64(layout.metadataOffset), 8) + Self.le(UInt64(VHDXLayout.mib), 4) + Self.le(1, 4)
        return Self.sealed(r, count: VHDXLayout.regionTableBytes)
    }

    func metadata() -> [UInt8] {
        let items: [(VHDXGUID, [UInt8], UInt32)] = [
            (VHDXLayout.fileParameters, Self.le(UInt64(layout.blockSize), 4) + Self.le(opts.fixed ? 1 : 0, 4), 4),
            (VHDXLayout.virtualDiskSize, Self.le(UInt64(size), 8), 6),
            (VHDXLayout.virtualDiskID, Self.newGUID(), 6),
            (VHDXLayout.logicalSectorSize, Self.le(UInt64(VHDXNewLayout.sector), 4), 6),
            (VHDXLayout.physicalSectorSize, Self.le(UInt64(VHDXNewLayout.physicalSector), 4), 6),
        ]
        var table = Array("metadata".utf8) + Self.le(0, 2) + Self.le(UInt64(items.count), 2) + [UInt8](repeating: 0, count: 20)
        var data: [UInt8] = []
        for (id, bytes, flags) in items {
            table += id.bytes + Self.le(UInt64(VHDXLayout.metadataTableBytes + data.count), 4) + Self.le(UInt64(bytes.count), 4)
                + Self.le(UInt64(flags), 4) + Self.le(0, 4)
            data += bytes
        }
        return table + [UInt8](repeating: 0, count: VHDXLayout.metadataTableBytes - table.count) + data
    }

    func close() async throws { try await file.close() }
}
