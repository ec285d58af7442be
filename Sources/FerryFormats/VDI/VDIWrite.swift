import FerryCore

/// A new VDI image, static (every block in place, block i at data + i MiB) or dynamic
/// (blocks taken by one bump pointer as data arrives, in any order).
///
/// The block map lives in memory and is written at `commit`, then the header: until then the
/// first sector is zeros, so an interrupted copy is never read as a VDI image.
final class VDIWriter: CommittingDevice, @unchecked Sendable {
    // @unchecked: the mutable state is behind `state`'s lock; the rest is immutable.
    let name: String
    let size: Int64
    let file: any BlockDevice
    let layout: VDILayout.New
    let isStatic: Bool
    let uuids = VDILayout.newUUIDs()

    struct State {
        var bmap: [UInt32]
        var allocated: Int64
        var markerOnDisk = true
        var used: Int64 = 0
    }
    private let state: Locked<State>

    init(name: String, file: any BlockDevice, layout: VDILayout.New, isStatic: Bool) {
        self.name = name
        self.file = file
        self.size = layout.size
        self.layout = layout
        self.isStatic = isStatic
        let n = Int(layout.blocks)
        state = Locked(State(bmap: isStatic ? (0 ..< n).map { UInt32($0) } : [UInt32](repeating: VDILayout.free, count: n),
                             allocated: isStatic ? layout.blocks : 0))
    }

    static func create(name: String, file: any BlockDevice, layout: VDILayout.New, isStatic: Bool) async throws -> VDIWriter {
        let w = VDIWriter(name: name, file: file, layout: layout, isStatic: isStatic)
        try await w.writeMarker()
        return w
    }

    var limits: BlockLimits {
        BlockLimits(alignment: max(file.limits.alignment, 512), preferredTransfer: 1 << 20, maximumTransfer: 32 << 20)
    }

    var capabilities: BlockCapabilities {
        guard isStatic else { return [.write, .flush, .zeroInit] }
        var c: BlockCapabilities = [.write, .flush]
        if file.capabilities.contains(.zero) { c.insert(.zero) }
        if file.capabilities.contains(.zeroInit) { c.insert(.zeroInit) }
        return c
    }

    var usedFileSize: Int64 { state.withLock { $0.used } }

    private func writeMarker() async throws {
        try await file.writePadded([UInt8](repeating: 0, count: 512), at: 0)
    }

    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await writeMarker() }
    }

    /// Host pieces of `offset ..< offset + length` (joined where contiguous), allocating
    /// blocks when `allocate`.
    private func plan(_ offset: Int64, _ length: Int64, allocate: Bool) throws -> [(host: Int64, from: Int, count: Int)] {
        var runs: [(host: Int64, from: Int, count: Int)] = []
        let bs = VDILayout.defaultBlockSize
        try state.withLock { s in
            var pos = offset
            let end = offset + length
            while pos < end {
                let b = Int(pos / bs)
                let n = min(end, Int64(b + 1) * bs) - pos
                var entry = s.bmap[b]
                if entry >= VDILayout.zero {
                    guard allocate else { pos += n; continue }
                    let at = layout.dataOffset + s.allocated * bs
                    guard at + bs <= file.size else {
                        throw FerryError(.noSpace, "vdi image file is full at block \(b)", path: name, offset: pos)
                    }
                    entry = UInt32(s.allocated)
                    s.allocated += 1
                    s.bmap[b] = entry
                }
                let host = layout.dataOffset + Int64(entry) * bs + (pos - Int64(b) * bs)
                let from = Int(pos - offset)
                appendJoining(&runs, host: host, from: from, count: Int(n))
                pos += n
            }
        }
        return runs
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try await write(at: offset, from: buffer, flags: flags, issued: {})
    }

    // The file's own hand-over (blocks are placed before the write is issued), so that the
    // writes of several requests overlap in order instead of holding the write turn until
    // each completes.
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
               issued: @escaping @Sendable () -> Void) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { issued(); return }
        try await beginChange()
        let pieces = try plan(offset, Int64(buffer.count), allocate: true).flatMap { r in
            PendingWrite.pieces(UnsafeRawBufferPointer(rebasing: buffer[r.from ..< r.from + r.count]),
                                at: r.host, maximum: file.limits.maximumTransfer)
        }
        try await file.writeInOrder(pieces, issued: issued)
        if flags.contains(.fua) { try await flush() }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        // A free block reads as zeros; an allocated one keeps its place.
        let runs = try plan(offset, length, allocate: false)
        guard !runs.isEmpty else { return }
        try await beginChange()
        for r in runs { try await file.writeZeroes(at: r.host, length: Int64(r.count), flags: []) }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        try await readTogether(try plan(offset, Int64(buffer.count), allocate: false).map {
            HostRead(device: file, host: $0.host, buffer: UnsafeMutableRawBufferPointer(rebasing: buffer[$0.from ..< $0.from + $0.count]))
        })
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func flush() async throws { try await commit(durable: true) }

    func commit(durable: Bool) async throws {
        let (bmap, allocated) = state.withLock { ($0.bmap, $0.allocated) }
        if durable { try await file.flush() }
        var table = [UInt8](repeating: 0, count: bmap.count * 4)
        for (i, e) in bmap.enumerated() { VDILayout.put32(&table, i * 4, e) }
        try await file.writePadded(table, at: VDILayout.bmapOffset)
        if durable { try await file.flush() }
        // Last, what makes it a VDI image: the header.
        try await file.writePadded(layout.header(isStatic: isStatic, allocated: allocated, uuids: uuids), at: 0)
        if durable { try await file.flush() }
        state.withLock { s in
            if s.allocated == allocated { s.markerOnDisk = false }
            s.used = layout.dataOffset + allocated * VDILayout.defaultBlockSize
        }
    }

    func close() async throws { try await file.close() }
}
