import FerryCore

/// A new fixed VHD: the guest bytes as they are, then the footer, written at `commit` (until
/// then the file ends in zeros and is no VHD image).
final class VHDFixedWriter: CommittingDevice, @unchecked Sendable {
    let name: String
    let size: Int64
    let file: any BlockDevice
    let footer: VHDLayout.Footer
    private let used = Locked<Int64>(0)

    init(name: String, file: any BlockDevice, size: Int64, footer: VHDLayout.Footer) {
        self.name = name
        self.file = file
        self.size = size
        self.footer = footer
    }

    var limits: BlockLimits {
        BlockLimits(alignment: file.limits.alignment, preferredTransfer: max(file.limits.alignment, 1 << 20),
                    maximumTransfer: file.limits.maximumTransfer)
    }

    var capabilities: BlockCapabilities {
        // The guest bytes are the file's: they read as zeros only if the file does (not an
        // existing device or export).
        var c: BlockCapabilities = [.write, .flush]
        if file.capabilities.contains(.zero) { c.insert(.zero) }
        if file.capabilities.contains(.zeroInit) { c.insert(.zeroInit) }
        // Preallocated: a write lands where the file puts it, whenever it comes.
        c.formUnion(file.capabilities.intersection(.anyWriteOrder))
        return c
    }

    var usedFileSize: Int64 { used.withLock { $0 } }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await file.read(at: offset, into: buffer)
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await file.write(at: offset, from: buffer, flags: flags)
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        try await file.writeZeroes(at: offset, length: length, flags: flags)
    }

    // The file's own hand-over, so that the writes of several requests overlap in order
    // (the default would hold the write turn until each write completes).
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
               issued: @escaping @Sendable () -> Void) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await file.write(at: offset, from: buffer, flags: flags, issued: issued)
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags,
                     issued: @escaping @Sendable () -> Void) async throws {
        try checkRange(offset, length)
        try await file.writeZeroes(at: offset, length: length, flags: flags, issued: issued)
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func flush() async throws { try await file.flush() }

    func commit(durable: Bool) async throws {
        if durable { try await file.flush() }
        try await file.writePadded(footer.bytes(), at: size)
        if durable { try await file.flush() }
        used.withLock { $0 = size + Int64(VHDLayout.footerSize) }
    }

    func close() async throws { try await file.close() }
}

/// A new dynamic VHD.
///
/// Layout: footer copy (0), dynamic disk header (512), BAT (4096), then blocks taken by one
/// bump pointer, each in a slot of 4 KiB + block size: the sector bitmap fills the last 512
/// bytes of the slot's first 4 KiB, so block data is 4 KiB aligned. A block is allocated
/// once (its bitmap, all ones, written by the writer that allocated it) and written in place
/// by as many writers as the engine runs.
///
/// The BAT lives in memory and is written at `commit`, then the footer at the end, then the
/// header and footer copy at 0: until then the first 4 KiB and the end of the file are zeros,
/// so an interrupted copy is never read as a VHD image.
final class VHDDynamicWriter: CommittingDevice, @unchecked Sendable {
    struct Layout {
        static let blockSize = VHDLayout.defaultBlockSize
        static let slot = 4096 + blockSize
        static let batOffset: Int64 = 4096
        let blocks: Int64
        let batBytes: Int64
        init(size: Int64) {
            blocks = (size + Self.blockSize - 1) / Self.blockSize
            batBytes = max(4096, (blocks * 4 + 4095) / 4096 * 4096)
        }
        var firstSlot: Int64 { Self.batOffset + batBytes }
        /// Where the footer is when every block is allocated.
        var fileEnd: Int64 { firstSlot + blocks * Self.slot }
    }

    let name: String
    let size: Int64
    let file: any BlockDevice
    let footer: VHDLayout.Footer
    let layout: Layout

    struct State {
        var bat: [UInt32]
        var next: Int64
        var markerOnDisk = true
        var used: Int64 = 0
    }
    private let state: Locked<State>

    init(name: String, file: any BlockDevice, footer: VHDLayout.Footer) {
        self.name = name
        self.file = file
        self.footer = footer
        self.size = Int64(footer.currentSize)
        self.layout = Layout(size: Int64(footer.currentSize))
        state = Locked(State(bat: [UInt32](repeating: VHDLayout.unallocated, count: Int(layout.blocks)), next: layout.firstSlot))
    }

    static func create(name: String, file: any BlockDevice, footer: VHDLayout.Footer) async throws -> VHDDynamicWriter {
        let w = VHDDynamicWriter(name: name, file: file, footer: footer)
        try await w.writeMarker()
        return w
    }

    var limits: BlockLimits {
        BlockLimits(alignment: max(file.limits.alignment, 512), preferredTransfer: 1 << 20, maximumTransfer: 32 << 20)
    }

    var capabilities: BlockCapabilities { [.write, .flush, .zeroInit] }

    var usedFileSize: Int64 { state.withLock { $0.used } }

    private func writeMarker() async throws {
        try await writeBlock([UInt8](repeating: 0, count: 4096), at: 0)
    }

    private func writeBlock(_ bytes: [UInt8], at offset: Int64) async throws {
        let buffer = AlignedBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.mutableBytes.copyMemory(from: $0) }
        try await file.write(at: offset, from: buffer.bytes, flags: [])
    }

    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await writeMarker() }
    }

    /// The first 4 KiB of a block's slot: zeros, then the sector bitmap (every sector here).
    private var slotPrefix: [UInt8] {
        var b = [UInt8](repeating: 0, count: 4096)
        let bm = Int(VHDLayout.bitmapBytes(blockSize: Layout.blockSize))
        for i in 4096 - bm ..< 4096 { b[i] = 0xFF }
        return b
    }

    /// Host pieces of `offset ..< offset + length`, allocating blocks when `allocate`.
    private func plan(_ offset: Int64, _ length: Int64, allocate: Bool)
        throws -> (runs: [(host: Int64, from: Int, count: Int)], fresh: [Int64]) {
        var runs: [(host: Int64, from: Int, count: Int)] = []
        var fresh: [Int64] = []
        let bs = Layout.blockSize
        try state.withLock { s in
            var pos = offset
            let end = offset + length
            while pos < end {
                let b = Int(pos / bs)
                let n = min(end, Int64(b + 1) * bs) - pos
                var entry = s.bat[b]
                if entry == VHDLayout.unallocated {
                    guard allocate else { pos += n; continue }
                    let slot = s.next
                    guard slot + Layout.slot <= file.size, (slot + 4096) / VHDLayout.sector < Int64(UInt32.max) else {
                        throw FerryError(.noSpace, "vpc image file is full at block \(b)", path: name, offset: pos)
                    }
                    s.next += Layout.slot
                    entry = UInt32((slot + 4096 - VHDLayout.bitmapBytes(blockSize: bs)) / VHDLayout.sector)
                    s.bat[b] = entry
                    fresh.append(slot)
                }
                let host = Int64(entry) * VHDLayout.sector + VHDLayout.bitmapBytes(blockSize: bs) + (pos - Int64(b) * bs)
                let from = Int(pos - offset)
                appendJoining(&runs, host: host, from: from, count: Int(n))
                pos += n
            }
        }
        return (runs, fresh)
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { return }
        try await beginChange()
        let (runs, fresh) = try plan(offset, Int64(buffer.count), allocate: true)
        let prefix = slotPrefix
        for slot in fresh { try await writeBlock(prefix, at: slot) }
        for r in runs {
            try await file.writeInOrder(PendingWrite.pieces(UnsafeRawBufferPointer(rebasing: buffer[r.from ..< r.from + r.count]),
                                                            at: r.host, maximum: file.limits.maximumTransfer), issued: {})
        }
        if flags.contains(.fua) { try await flush() }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        // A block not allocated reads as zeros; an allocated one keeps its place.
        let (runs, _) = try plan(offset, length, allocate: false)
        guard !runs.isEmpty else { return }
        try await beginChange()
        for r in runs { try await file.writeZeroes(at: r.host, length: Int64(r.count), flags: []) }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let (runs, _) = try plan(offset, Int64(buffer.count), allocate: false)
        try await readTogether(runs.map {
            HostRead(device: file, host: $0.host, buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[$0.from ..< $0.from + $0.count]))
        })
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func flush() async throws { try await commit(durable: true) }

    func commit(durable: Bool) async throws {
        let (bat, next) = state.withLock { ($0.bat, $0.next) }
        if durable { try await file.flush() }
        var table = [UInt8](repeating: 0xFF, count: Int(layout.batBytes))
        for (i, e) in bat.enumerated() { VHDLayout.put32(&table, i * 4, e) }
        try await writeBlock(table, at: Layout.batOffset)
        // The footer at the end (in a 4 KiB write; the file is cut to its 512 bytes).
        let f = footer.bytes()
        var tail = [UInt8](repeating: 0, count: 4096)
        tail.replaceSubrange(0 ..< 512, with: f)
        guard next + 4096 <= file.size else {
            throw FerryError(.noSpace, "no room for the vpc footer at offset \(next)", path: name, offset: next)
        }
        try await writeBlock(tail, at: next)
        if durable { try await file.flush() }
        // Last, what makes it a VHD image: footer copy and dynamic disk header.
        var head = [UInt8](repeating: 0, count: 4096)
        head.replaceSubrange(0 ..< 512, with: f)
        head.replaceSubrange(512 ..< 1536, with: VHDLayout.Header(tableOffset: UInt64(Layout.batOffset), maxTableEntries: UInt32(layout.blocks),
                                                                  blockSize: UInt32(Layout.blockSize)).bytes())
        try await writeBlock(head, at: 0)
        if durable { try await file.flush() }
        state.withLock { s in
            if s.next == next { s.markerOnDisk = false }
            s.used = next + 512
        }
    }

    func close() async throws { try await file.close() }
}
