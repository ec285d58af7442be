#if canImport(Glibc)
import Glibc
#endif
import FerryCore

/// A new monolithicSparse or twoGbMaxExtentSparse image being written.
///
/// Each sparse extent is laid out as qemu and VMware do: header, descriptor (monolithicSparse
/// only), the redundant grain directory with all its grain tables, the grain directory with
/// all its grain tables, then grains from `overhead` on. Every table has its place from the
/// start, so the directories never change; grains are taken by one bump pointer per extent
/// and written in place by as many writers as the engine runs, in parallel. A grain is
/// allocated once and rewritten in place afterwards.
///
/// The grain tables live in memory and are written at `commit`, with the descriptor, and the
/// header last: until then the header sector is zero (the descriptor file of
/// twoGbMaxExtentSparse is empty), so an interrupted copy never looks like a VMDK image.
final class VMDKSparseWriter: CommittingDevice, LayeredDevice, @unchecked Sendable {
    struct ExtentFile {
        let file: any BlockDevice
        /// The extent's own path when it is not the image's file (cut to size at commit).
        let path: String?
        let fileName: String
        let start: Int64
        let length: Int64
        let layout: VMDKLayout.Sparse
        /// Grains must end below this (the file's size; 32-bit sector numbers).
        let limit: Int64
    }

    let name: String
    let size: Int64
    let backing: (any BlockDevice)?
    /// The image's file: the single extent (monolithicSparse) or the descriptor.
    let mainFile: any BlockDevice
    let extents: [ExtentFile]
    let opts: VMDKCreateOptions
    let cid = VMDKLayout.newCID()
    let parentCID: UInt32
    private let slow = AsyncMutex()

    static let gs = VMDKLayout.grainSize

    struct State {
        /// Grain table entries of each extent (sector of the grain; 0 unallocated, 1 zero grain).
        var gt: [[UInt32]]
        /// Next free sector of each extent.
        var next: [Int64]
        var dirty: [Set<Int>]
        var markerOnDisk = true
        var used: Int64 = 0
    }
    private let state: Locked<State>

    init(name: String, size: Int64, mainFile: any BlockDevice, extents: [ExtentFile], opts: VMDKCreateOptions,
         parentCID: UInt32, backing: (any BlockDevice)?) {
        self.name = name
        self.size = size
        self.mainFile = mainFile
        self.extents = extents
        self.opts = opts
        self.parentCID = parentCID
        self.backing = backing
        state = Locked(State(
            gt: extents.map { [UInt32](repeating: 0, count: Int(($0.length + Self.gs - 1) / Self.gs)) },
            next: extents.map { $0.layout.overhead },
            dirty: extents.map { _ in [] }))
    }

    static func create(file: any BlockDevice, size: Int64, options: VMDKCreateOptions, parentCID: UInt32,
                       context: CreateContext) async throws -> VMDKSparseWriter {
        var extents: [ExtentFile] = []
        func limit(_ f: any BlockDevice) -> Int64 { min(f.size, VMDKWriter.maxSparseFile) }
        if options.subformat == .monolithicSparse {
            let name = context.location.split(separator: "/").last.map(String.init) ?? context.location
            extents.append(ExtentFile(file: file, path: nil, fileName: name, start: 0, length: size,
                                      layout: .init(capacity: VMDKLayout.sectors(size)), limit: limit(file)))
        } else {
            let pieces = max(1, (size + VMDKLayout.splitSize - 1) / VMDKLayout.splitSize)
            do {
                for k in 0 ..< pieces {
                    let start = k * VMDKLayout.splitSize
                    let length = min(VMDKLayout.splitSize, size - start)
                    let layout = VMDKLayout.Sparse(capacity: VMDKLayout.sectors(length))
                    let fileName = VMDKLayout.extentName(context.location, suffix: "s" + pad3(Int(k) + 1))
                    let path = VMDKLayout.sibling(fileName, of: context.location)
                    let grains = (length + gs - 1) / gs
                    let device = try await context.createFile(path, layout.overhead * VMDKLayout.sector + grains * gs)
                    extents.append(ExtentFile(file: device, path: path, fileName: fileName, start: start, length: length,
                                              layout: layout, limit: limit(device)))
                }
            } catch {
                for e in extents { try? await e.file.close() }
                throw error
            }
        }
        let w = VMDKSparseWriter(name: context.location, size: size, mainFile: file, extents: extents, opts: options,
                                 parentCID: parentCID, backing: context.backing)
        try await w.writeMarker()
        return w
    }

    var limits: BlockLimits {
        let align = extents.map(\.file.limits.alignment).max() ?? 1
        return BlockLimits(alignment: max(align, Int(Self.gs)), preferredTransfer: 1 << 20, maximumTransfer: 32 << 20)
    }

    var capabilities: BlockCapabilities {
        var c: BlockCapabilities = [.write, .flush]
        if opts.zeroedGrain { c.insert(.zero) }
        if backing == nil { c.insert(.zeroInit) }
        return c
    }

    var usedFileSize: Int64 { state.withLock { $0.used } }

    /// Zeros over the header (or the descriptor file's start): not a VMDK image until commit.
    private func writeMarker() async throws {
        try await mainFile.writePadded([UInt8](repeating: 0, count: 512), at: 0)
    }

    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await writeMarker() }
    }

    // MARK: - the mapping (inside the lock)

    private func extentIndex(_ offset: Int64) -> Int {
        extents.count == 1 ? 0 : Int(offset / VMDKLayout.splitSize)
    }

    private func full(_ e: ExtentFile) -> FerryError {
        FerryError(.noSpace, "vmdk sparse extent '\(e.fileName)' is full (grains are addressed by 32-bit sector numbers: at most 2 TiB per file)", path: name)
    }

    private func allocate(_ s: inout State, _ k: Int, grain g: Int) throws -> Int64 {
        let e = extents[k]
        let sector = s.next[k]
        guard (sector + VMDKLayout.grainSectors) * VMDKLayout.sector <= e.limit else { throw full(e) }
        s.next[k] = sector + VMDKLayout.grainSectors
        s.gt[k][g] = UInt32(sector)
        s.dirty[k].insert(g / Int(VMDKLayout.gtEntries))
        return sector * VMDKLayout.sector
    }

    enum Decision { case host(Int, Int64), slow, done }

    /// Where `length` bytes at guest `offset` (within one grain) go.
    private func mapWrite(_ s: inout State, at offset: Int64, length: Int64) throws -> Decision {
        let k = extentIndex(offset)
        let rel = offset - extents[k].start
        let g = Int(rel / Self.gs)
        let within = rel % Self.gs
        let whole = within == 0 && (length == Self.gs || offset + length == size)
        let entry = s.gt[k][g]
        if entry > 1 { return .host(k, Int64(entry) * VMDKLayout.sector + within) }
        // A fresh grain reads as zeros: enough unless the rest must come from the backing file.
        guard whole || entry == 1 || backing == nil else { return .slow }
        return .host(k, try allocate(&s, k, grain: g) + within)
    }

    /// How to make `length` bytes at guest `offset` (within one grain) read as zeros.
    private func mapZero(_ s: inout State, at offset: Int64, length: Int64) throws -> Decision {
        let k = extentIndex(offset)
        let rel = offset - extents[k].start
        let g = Int(rel / Self.gs)
        let within = rel % Self.gs
        let whole = within == 0 && (length == Self.gs || offset + length == size)
        let entry = s.gt[k][g]
        if whole && opts.zeroedGrain {
            if entry != 1 {
                s.gt[k][g] = 1
                s.dirty[k].insert(g / Int(VMDKLayout.gtEntries))
            }
            return .done
        }
        if entry > 1 { return .host(k, Int64(entry) * VMDKLayout.sector + within) }
        if entry == 1 || backing == nil { return .done }
        // Over a backing file without zero grains: real zeros in a grain of its own.
        guard whole else { return .slow }
        return .host(k, try allocate(&s, k, grain: g) + within)
    }

    /// Runs `map` on every grain piece of `offset ..< offset + length`: host runs (joined
    /// where they continue each other) and the pieces that need the slow path.
    private func plan(_ offset: Int64, _ length: Int64, _ map: (inout State, Int64, Int64) throws -> Decision) throws
        -> (runs: [(k: Int, host: Int64, from: Int, count: Int)], slow: [(at: Int64, from: Int, count: Int)]) {
        var runs: [(k: Int, host: Int64, from: Int, count: Int)] = []
        var slowOnes: [(at: Int64, from: Int, count: Int)] = []
        let end = offset + length
        try state.withLock { s in
            var pos = offset
            while pos < end {
                let n = min(end, (pos / Self.gs + 1) * Self.gs) - pos
                let from = Int(pos - offset)
                switch try map(&s, pos, n) {
                case .host(let k, let h):
                    if let last = runs.last, last.k == k, last.host + Int64(last.count) == h, last.from + last.count == from {
                        runs[runs.count - 1].count += Int(n)
                    } else {
                        runs.append((k, h, from, Int(n)))
                    }
                case .slow: slowOnes.append((pos, from, Int(n)))
                case .done: break
                }
                pos += n
            }
        }
        return (runs, slowOnes)
    }

    // MARK: - BlockDevice

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { return }
        try await beginChange()
        let (runs, slowOnes) = try plan(offset, Int64(buffer.count)) { s, at, n in try mapWrite(&s, at: at, length: n) }
        for r in runs {
            let file = extents[r.k].file
            try await file.writeInOrder(PendingWrite.pieces(UnsafeRawBufferPointer(rebasing: buffer[r.from ..< r.from + r.count]),
                                                            at: r.host, maximum: file.limits.maximumTransfer), issued: {})
        }
        for p in slowOnes {
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[p.from ..< p.from + p.count])
            try await rewrite(at: p.at, length: p.count) { $0.copyMemory(from: bytes) }
        }
        if flags.contains(.fua) { try await flush() }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        if flags.contains(.fastOnly) && !opts.zeroedGrain {
            throw FerryError(.notSupported, "zeroing writes zero bytes in this vmdk image (no zeroed_grain)", path: name, offset: offset)
        }
        try await beginChange()
        let (runs, slowOnes) = try plan(offset, length) { s, at, n in try mapZero(&s, at: at, length: n) }
        for r in runs {
            // Keeps the grain allocated: only its bytes become zeros.
            try await extents[r.k].file.writeZeroes(at: r.host, length: Int64(r.count), flags: [])
        }
        for p in slowOnes {
            try await rewrite(at: p.at, length: p.count) { $0.initializeMemory(as: UInt8.self, repeating: 0) }
        }
    }

    /// Read-modify-write of part of one grain over a backing file, one at a time.
    private func rewrite(at offset: Int64, length: Int, _ change: (UnsafeMutableRawBufferPointer) -> Void) async throws {
        await slow.lock()
        defer { slow.unlock() }
        let start = offset / Self.gs * Self.gs
        let buffer = AlignedBuffer(count: Int(min(Self.gs, size - start)))
        try await read(at: start, into: buffer.mutableBytes)
        let within = Int(offset - start)
        change(UnsafeMutableRawBufferPointer(rebasing: buffer.mutableBytes[within ..< within + length]))
        let (runs, _) = try plan(start, Int64(buffer.count)) { s, at, n in try mapWrite(&s, at: at, length: n) }
        for r in runs {
            try await extents[r.k].file.write(at: r.host, from: UnsafeRawBufferPointer(rebasing: buffer.bytes[r.from ..< r.from + r.count]), flags: [])
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        while pos < end {
            let n = min(end, (pos / Self.gs + 1) * Self.gs) - pos
            let k = extentIndex(pos)
            let rel = pos - extents[k].start
            let entry = state.withLock { $0.gt[k][Int(rel / Self.gs)] }
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(pos - offset + n)])
            if entry > 1 {
                try await extents[k].file.read(at: Int64(entry) * VMDKLayout.sector + rel % Self.gs, into: dst)
            } else if entry == 0 {
                try await readFromBacking(backing, at: pos, into: dst)
            } else {
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            }
            pos += n
        }
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try await extents(in: range)
    }

    // MARK: - commit

    func flush() async throws {
        try await commit(durable: true)
    }

    func commit(durable: Bool) async throws {
        let (gt, dirty, next, marker) = state.withLock { s in (s.gt, s.dirty, s.next, s.markerOnDisk) }
        guard marker || dirty.contains(where: { !$0.isEmpty }) else {
            if durable { for e in extents { try await e.file.flush() } }
            return
        }
        let tableBytes = Int(VMDKLayout.gtSectors * VMDKLayout.sector)
        for (k, e) in extents.enumerated() {
            // Consecutive tables lie next to each other: one write for each run of them.
            var groups: [[Int]] = []
            for i in dirty[k].sorted() {
                if let last = groups.last?.last, last + 1 == i, groups[groups.count - 1].count < 4096 {
                    groups[groups.count - 1].append(i)
                } else {
                    groups.append([i])
                }
            }
            for group in groups {
                let buffer = AlignedBuffer(count: group.count * tableBytes)
                buffer.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                for (n, i) in group.enumerated() {
                    let first = i * Int(VMDKLayout.gtEntries)
                    for j in first ..< min(first + Int(VMDKLayout.gtEntries), gt[k].count) {
                        buffer.mutableBytes.storeBytes(of: gt[k][j].littleEndian, toByteOffset: n * tableBytes + (j - first) * 4, as: UInt32.self)
                    }
                }
                // The redundant copy is the same tables in their own place.
                for redundant in [true, false] {
                    let at = e.layout.table(group[0], redundant: redundant) * VMDKLayout.sector
                    try await e.file.writeInOrder(PendingWrite.pieces(buffer.bytes, at: at, maximum: e.file.limits.maximumTransfer), issued: {})
                }
            }
            if marker {
                for redundant in [true, false] {
                    let gd = (0 ..< Int(e.layout.tables)).flatMap { i -> [UInt8] in
                        let v = UInt32(e.layout.table(i, redundant: redundant)).littleEndian
                        return withUnsafeBytes(of: v) { Array($0) }
                    }
                    if !gd.isEmpty {
                        try await e.file.writePadded(gd, at: (redundant ? e.layout.rgdOffset : e.layout.gdOffset) * VMDKLayout.sector)
                    }
                }
            }
        }
        let split = opts.subformat.isSplit
        let lines = extents.map { "RW \(VMDKLayout.sectors($0.length)) SPARSE \"\($0.fileName)\"" }
        let text = VMDKLayout.descriptor(cid: cid, parentCID: parentCID, createType: opts.subformat.rawValue, parentHint: opts.backingFile,
                                         extents: lines, sizeSectors: VMDKLayout.sectors(size), options: opts)
        let textBytes = Array(text.utf8)
        if !split {
            guard textBytes.count <= Int(VMDKLayout.descriptorSectors * VMDKLayout.sector) else {
                throw FerryError(.invalidArgument, "the descriptor (\(textBytes.count) bytes) does not fit in its \(VMDKLayout.descriptorSectors) sectors", path: name)
            }
            try await mainFile.writePadded(textBytes, at: VMDKLayout.descriptorOffset * VMDKLayout.sector)
        }
        if durable { for e in extents { try await e.file.flush() } }
        // The headers last: before them nothing reads as a VMDK image.
        for e in extents {
            let h = VMDKLayout.Header(
                version: opts.zeroedGrain ? 2 : 1,
                flags: VMDKLayout.flagNewlineDetect | VMDKLayout.flagRedundantGD | (opts.zeroedGrain ? VMDKLayout.flagZeroedGrain : 0),
                capacity: e.layout.capacity,
                descriptorOffset: split ? 0 : VMDKLayout.descriptorOffset, descriptorSectors: split ? 0 : VMDKLayout.descriptorSectors,
                rgdOffset: e.layout.rgdOffset, gdOffset: UInt64(e.layout.gdOffset), overhead: e.layout.overhead)
            try await e.file.writePadded(h.bytes(), at: 0)
        }
        var used = next[0] * VMDKLayout.sector
        if split {
            guard textBytes.count <= mainFile.size else {
                throw FerryError(.noSpace, "the descriptor (\(textBytes.count) bytes) does not fit in the image file", path: name)
            }
            try await mainFile.writePadded(textBytes, at: 0)
            used = Int64(textBytes.count)
            for (k, e) in extents.enumerated() {
                if let path = e.path, truncate(path, off_t(next[k] * VMDKLayout.sector)) != 0 {
                    throw FerryError.posix(errno, "could not set the size of the extent file", path: path)
                }
            }
        }
        if durable {
            for e in extents { try await e.file.flush() }
            if split { try await mainFile.flush() }
        }
        state.withLock { s in
            for k in s.dirty.indices { s.dirty[k].subtract(dirty[k]) }
            s.markerOnDisk = false
            s.used = used
        }
    }

    func close() async throws {
        var firstError: (any Error)?
        for e in extents where e.path != nil { do { try await e.file.close() } catch { firstError = firstError ?? error } }
        do { try await mainFile.close() } catch { firstError = firstError ?? error }
        if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
        if let firstError { throw firstError }
    }
}
