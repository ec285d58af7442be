import FerryCore

/// A new streamOptimized image, the kind ESXi, OVF tools and cloud importers take: written
/// strictly front to back, so it can be read from a pipe.
///
/// Layout (Virtual Disk Format 5.0, stream-optimized sparse extents): the header (version 3,
/// compressed grains with markers, the directory's offset as in the footer) and the embedded descriptor in the
/// first grain; then each grain as a marker (its guest sector and compressed size) followed
/// by the grain deflated with a zlib header, padded to a sector; after the last grain of each
/// grain table, that table behind a GT marker; at the end the grain directory behind a GD
/// marker, the footer (the header again, with the real `gdOffset`) behind a footer marker,
/// and an end-of-stream marker. Zero runs and holes are simply left out (tables with no
/// grain are 0 in the directory).
///
/// The engine's workers compress grains in parallel (`compress`); `writeCompressed` appends
/// them in guest order. The header is written last, at `commit`: until then the first sector
/// is zero and the file is no VMDK image.
final class VMDKStreamWriter: ClusterCompressingDevice, CommittingDevice, LayeredDevice, @unchecked Sendable {
    let name: String
    let size: Int64
    let backing: (any BlockDevice)?
    let file: any BlockDevice
    let opts: VMDKCreateOptions
    let cid = VMDKLayout.newCID()
    let parentCID: UInt32
    let compressors = GrainCompressors()
    let tables: Int

    static let gs = VMDKLayout.grainSize
    static let sector = VMDKLayout.sector
    /// Metadata marker types.
    static let markerEOS: UInt32 = 0
    static let markerGT: UInt32 = 1
    static let markerGD: UInt32 = 2
    static let markerFooter: UInt32 = 3

    struct State {
        /// Next byte of the file to append at (a sector boundary).
        var pos: Int64
        /// Guest bytes before this are written (or skipped): writes must not go back.
        var nextGuest: Int64 = 0
        /// The grain table being filled, and its entries.
        var table = -1
        var entries = [UInt32](repeating: 0, count: Int(VMDKLayout.gtEntries))
        /// Sector of each grain table (0: none).
        var gd: [UInt32]
        var markerOnDisk = true
        var used: Int64 = 0
    }
    private let state: Locked<State>

    init(name: String, file: any BlockDevice, size: Int64, opts: VMDKCreateOptions, parentCID: UInt32, backing: (any BlockDevice)?) {
        self.name = name
        self.file = file
        self.size = size
        self.opts = opts
        self.parentCID = parentCID
        self.backing = backing
        let grains = (size + Self.gs - 1) / Self.gs
        tables = Int((grains + VMDKLayout.gtEntries - 1) / VMDKLayout.gtEntries)
        state = Locked(State(pos: VMDKLayout.grainSectors * Self.sector, gd: [UInt32](repeating: 0, count: tables)))
    }

    static func create(file: any BlockDevice, size: Int64, options: VMDKCreateOptions, parentCID: UInt32,
                       context: CreateContext) async throws -> VMDKStreamWriter {
        let w = VMDKStreamWriter(name: context.location, file: file, size: size, opts: options, parentCID: parentCID,
                                 backing: context.backing)
        try await file.writePadded([UInt8](repeating: 0, count: 512), at: 0)
        return w
    }

    var limits: BlockLimits {
        BlockLimits(alignment: max(Int(Self.gs), file.limits.alignment), preferredTransfer: 1 << 20, maximumTransfer: 32 << 20)
    }

    var capabilities: BlockCapabilities {
        var c: BlockCapabilities = [.write, .flush, .sequentialWrites]
        if backing == nil { c.insert(.zeroInit) }
        return c
    }

    var compressesWrites: Bool { true }
    func enableCompression() {}
    var usedFileSize: Int64 { state.withLock { $0.used } }

    private func beginChange() async throws {
        let needed = state.withLock { s -> Bool in
            if s.markerOnDisk { return false }
            s.markerOnDisk = true
            return true
        }
        if needed { try await file.writePadded([UInt8](repeating: 0, count: 512), at: 0) }
    }

    private func outOfOrder(_ offset: Int64, after: Int64) -> FerryError {
        FerryError(.io, "internal error: streamOptimized image written out of order (guest offset \(offset) after \(after) was written)",
                   path: name, offset: offset)
    }

    // MARK: - compression (in the engine's workers)

    func compress(_ data: UnsafeRawBufferPointer, at offset: Int64, into output: UnsafeMutableRawBufferPointer) -> [CompressedPiece] {
        precondition(offset % Self.gs == 0 && output.count >= data.count)
        var pieces: [CompressedPiece] = []
        var from = 0, to = 0
        let gs = Int(Self.gs)
        while from < data.count {
            let n = min(gs, data.count - from)
            let input = UnsafeRawBufferPointer(rebasing: data[from ..< from + n])
            // A short last grain is compressed padded with zeros to a whole grain, as readers
            // expect every grain to inflate to the grain size.
            var padded: AlignedBuffer?
            if n < gs {
                let p = AlignedBuffer(count: gs)
                p.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                UnsafeMutableRawBufferPointer(rebasing: p.mutableBytes[0 ..< n]).copyMemory(from: input)
                padded = p
            }
            if let c = compressors.compress(padded?.bytes ?? input, into: UnsafeMutableRawBufferPointer(rebasing: output[to ..< to + n])) {
                pieces.append(CompressedPiece(guestOffset: offset + Int64(from), start: to, length: c, guestLength: n, compressed: true))
                to += c
            } else {
                // Does not shrink: stored (level 0) in its turn, a few bytes larger.
                UnsafeMutableRawBufferPointer(rebasing: output[to ..< to + n]).copyMemory(from: input)
                pieces.append(CompressedPiece(guestOffset: offset + Int64(from), start: to, length: n, guestLength: n, compressed: false))
                to += n
            }
            from += n
        }
        return pieces
    }

    // MARK: - appending (in guest order)

    private enum Segment {
        case grain(lba: Int64, bytes: UnsafeRawBufferPointer, at: Int64)
        case table([UInt32], at: Int64)
    }

    private static func markerSectors(dataBytes n: Int) -> Int64 { VMDKLayout.sectors(Int64(12 + n)) }

    /// Closes the grain table being filled: its place after the grains so far, behind a marker.
    private func closeTable(_ s: inout State, into out: inout [Segment]) {
        guard s.table >= 0 else { return }
        out.append(.table(s.entries, at: s.pos))
        s.gd[s.table] = UInt32(s.pos / Self.sector + 1)
        s.pos += (1 + VMDKLayout.gtSectors) * Self.sector
    }

    func writeCompressed(_ pieces: [CompressedPiece], from output: UnsafeRawBufferPointer) async throws {
        guard !pieces.isEmpty else { return }
        try await beginChange()
        // Grains that did not shrink, stored.
        var stored: [Int: (AlignedBuffer, Int)] = [:]
        for (i, p) in pieces.enumerated() where !p.compressed {
            let input = AlignedBuffer(count: Int(Self.gs))
            input.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
            UnsafeMutableRawBufferPointer(rebasing: input.mutableBytes[0 ..< p.guestLength])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: output[p.start ..< p.start + p.guestLength]))
            let out = AlignedBuffer(count: GrainCompressors.bound(Int(Self.gs)))
            guard let n = compressors.compress(input.bytes, into: out.mutableBytes, store: true) else {
                throw FerryError(.io, "internal error: a grain could not be stored", path: name, offset: p.guestOffset)
            }
            stored[i] = (out, n)
        }
        let grains: [(lba: Int64, bytes: UnsafeRawBufferPointer)] = pieces.enumerated().map { i, p in
            if let (b, n) = stored[i] { return (p.guestOffset / Self.sector, UnsafeRawBufferPointer(rebasing: b.bytes[0 ..< n])) }
            return (p.guestOffset / Self.sector, UnsafeRawBufferPointer(rebasing: output[p.start ..< p.start + p.length]))
        }
        try await append(grains, guestStart: pieces[0].guestOffset, guestEnd: pieces.last!.guestOffset + Int64(pieces.last!.guestLength))
        withExtendedLifetime(stored) {}
    }

    /// Appends grains (ascending guest sectors, each with its compressed bytes) and the
    /// grain tables they close.
    private func append(_ grains: [(lba: Int64, bytes: UnsafeRawBufferPointer)], guestStart: Int64, guestEnd: Int64) async throws {
        let (start, end, segments) = try state.withLock { s -> (Int64, Int64, [Segment]) in
            guard guestStart >= s.nextGuest else { throw outOfOrder(guestStart, after: s.nextGuest) }
            let start = s.pos
            var out: [Segment] = []
            for g in grains {
                let t = Int(g.lba * Self.sector / VMDKLayout.gtCoverage)
                if t != s.table {
                    closeTable(&s, into: &out)
                    s.table = t
                    s.entries = [UInt32](repeating: 0, count: Int(VMDKLayout.gtEntries))
                }
                let j = Int(g.lba * Self.sector / Self.gs % VMDKLayout.gtEntries)
                s.entries[j] = UInt32(s.pos / Self.sector)
                out.append(.grain(lba: g.lba, bytes: g.bytes, at: s.pos))
                s.pos += Self.markerSectors(dataBytes: g.bytes.count) * Self.sector
            }
            guard s.pos <= file.size, s.pos / Self.sector <= Int64(UInt32.max) else {
                throw FerryError(.noSpace, "streamOptimized image file is full (more data than the image can hold)", path: name)
            }
            s.nextGuest = guestEnd
            return (start, s.pos, out)
        }
        let buffer = AlignedBuffer(count: Int(end - start))
        fill(buffer, segments, base: start)
        try await file.writeInOrder(PendingWrite.pieces(buffer.bytes, at: start, maximum: file.limits.maximumTransfer), issued: {})
    }

    private func fill(_ buffer: AlignedBuffer, _ segments: [Segment], base: Int64) {
        let p = buffer.mutableBytes
        p.initializeMemory(as: UInt8.self, repeating: 0)
        for seg in segments {
            switch seg {
            case .grain(let lba, let bytes, let at):
                let o = Int(at - base)
                p.storeBytes(of: UInt64(lba).littleEndian, toByteOffset: o, as: UInt64.self)
                p.storeBytes(of: UInt32(bytes.count).littleEndian, toByteOffset: o + 8, as: UInt32.self)
                UnsafeMutableRawBufferPointer(rebasing: p[o + 12 ..< o + 12 + bytes.count]).copyMemory(from: bytes)
            case .table(let entries, let at):
                let o = Int(at - base)
                Self.storeMarker(p, at: o, sectors: VMDKLayout.gtSectors, type: Self.markerGT)
                for (j, e) in entries.enumerated() {
                    p.storeBytes(of: e.littleEndian, toByteOffset: o + 512 + j * 4, as: UInt32.self)
                }
            }
        }
    }

    private static func storeMarker(_ p: UnsafeMutableRawBufferPointer, at o: Int, sectors: Int64, type: UInt32) {
        p.storeBytes(of: UInt64(sectors).littleEndian, toByteOffset: o, as: UInt64.self)
        p.storeBytes(of: UInt32(0), toByteOffset: o + 8, as: UInt32.self)
        p.storeBytes(of: type.littleEndian, toByteOffset: o + 12, as: UInt32.self)
    }

    /// A zero grain, compressed once (for zero runs over a backing file).
    private let zeroGrain = Locked<UnsafeRawBufferPointer?>(nil)
    private let zeroGrainStorage = Locked<AlignedBuffer?>(nil)

    private func compressedZeroGrain() throws -> UnsafeRawBufferPointer {
        if let z = zeroGrain.withLock({ $0 }) { return z }
        let input = AlignedBuffer(count: Int(Self.gs))
        input.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        let out = AlignedBuffer(count: GrainCompressors.bound(Int(Self.gs)))
        guard let n = compressors.compress(input.bytes, into: out.mutableBytes) else {
            throw FerryError(.io, "internal error: a zero grain could not be compressed", path: name)
        }
        let z = UnsafeRawBufferPointer(rebasing: out.bytes[0 ..< n])
        zeroGrainStorage.withLock { $0 = out }
        zeroGrain.withLock { $0 = z }
        return z
    }

    // MARK: - BlockDevice

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard buffer.count > 0 else { return }
        let n = Int64(buffer.count)
        guard offset % Self.gs == 0, n % Self.gs == 0 || offset + n == size else {
            throw FerryError(.invalidArgument, "a streamOptimized image is written in whole grains of 64 KiB (a write of \(n) bytes at \(offset) is not)",
                             path: name, offset: offset)
        }
        let out = AlignedBuffer(count: buffer.count)
        let pieces = compress(buffer, at: offset, into: out.mutableBytes)
        try await writeCompressed(pieces, from: out.bytes)
        if flags.contains(.fua) { try await file.flush() }
    }

    /// Without a backing file a zero run is left out (it reads as zeros); over one, zero
    /// grains are stored so that the run does not show the backing file.
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        guard backing != nil else {
            try state.withLock { s in
                guard offset >= s.nextGuest else { throw outOfOrder(offset, after: s.nextGuest) }
                s.nextGuest = offset + length
            }
            return
        }
        if flags.contains(.fastOnly) {
            throw FerryError(.notSupported, "zeroing stores zero grains in a streamOptimized image over a backing file", path: name, offset: offset)
        }
        guard offset % Self.gs == 0, length % Self.gs == 0 || offset + length == size else {
            throw FerryError(.invalidArgument, "a streamOptimized image over a backing file zeroes whole grains of 64 KiB (\(length) bytes at \(offset) are not)",
                             path: name, offset: offset)
        }
        try await beginChange()
        let zb = try compressedZeroGrain()
        var pos = offset
        let step = Int64(1024) * Self.gs
        while pos < offset + length {
            let end = min(offset + length, pos + step)
            let grains = stride(from: pos, to: end, by: Int(Self.gs)).map { (lba: $0 / Self.sector, bytes: zb) }
            try await append(grains, guestStart: pos, guestEnd: end)
            pos = end
        }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        throw FerryError(.notSupported, "a streamOptimized image cannot be read while it is written", path: name, offset: offset)
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try await extents(in: range)
    }

    /// Only makes the data durable: the directory and footer close the stream, at `commit`.
    func flush() async throws {
        try await file.flush()
    }

    // MARK: - commit

    private func header(gdOffset: UInt64) -> VMDKLayout.Header {
        VMDKLayout.Header(version: 3, flags: VMDKLayout.flagNewlineDetect | VMDKLayout.flagCompressed | VMDKLayout.flagMarkers,
                          capacity: VMDKLayout.sectors(size), descriptorOffset: VMDKLayout.descriptorOffset,
                          descriptorSectors: VMDKLayout.descriptorSectors, rgdOffset: 0, gdOffset: gdOffset,
                          overhead: VMDKLayout.grainSectors, compressAlgorithm: 1)
    }

    /// Appends the last grain table, the directory, the footer and the end-of-stream marker,
    /// then writes the descriptor and the header. Later writes go over the directory and
    /// footer, which the next commit writes again after them.
    func commit(durable: Bool) async throws {
        let (start, segments, gd, gdSector, end) = try state.withLock { s -> (Int64, [Segment], [UInt32], Int64, Int64) in
            let start = s.pos
            var out: [Segment] = []
            closeTable(&s, into: &out)
            let tail = s.pos
            s.pos = start
            // The table closed here may still fill (later writes go over this tail): it is
            // then written again when it is closed again.
            let gdSectors = VMDKLayout.sectors(Int64(tables) * 4)
            let gdSector = tail / Self.sector + 1
            let end = tail + (1 + gdSectors + 3) * Self.sector
            guard end <= file.size else {
                throw FerryError(.noSpace, "streamOptimized image file is full (no room for its directory and footer)", path: name)
            }
            return (start, out, s.gd, gdSector, end)
        }
        let buffer = AlignedBuffer(count: Int(end - start))
        fill(buffer, segments, base: start)
        let p = buffer.mutableBytes
        var o = Int(gdSector * Self.sector - start) - 512
        let gdSectors = VMDKLayout.sectors(Int64(tables) * 4)
        Self.storeMarker(p, at: o, sectors: gdSectors, type: Self.markerGD)
        for (i, e) in gd.enumerated() { p.storeBytes(of: e.littleEndian, toByteOffset: o + 512 + i * 4, as: UInt32.self) }
        o += Int(1 + gdSectors) * 512
        Self.storeMarker(p, at: o, sectors: 1, type: Self.markerFooter)
        header(gdOffset: UInt64(gdSector)).encode(into: UnsafeMutableRawBufferPointer(rebasing: p[o + 512 ..< o + 1024]))
        // The end-of-stream marker: a zero sector (already zero).
        try await file.writeInOrder(PendingWrite.pieces(buffer.bytes, at: start, maximum: file.limits.maximumTransfer), issued: {})

        let text = VMDKLayout.descriptor(cid: cid, parentCID: parentCID, createType: opts.subformat.rawValue, parentHint: opts.backingFile,
                                         extents: ["RW \(VMDKLayout.sectors(size)) SPARSE \"\(name.split(separator: "/").last.map(String.init) ?? name)\""],
                                         sizeSectors: VMDKLayout.sectors(size), options: opts)
        let textBytes = Array(text.utf8)
        guard textBytes.count <= Int(VMDKLayout.descriptorSectors * Self.sector) else {
            throw FerryError(.invalidArgument, "the descriptor (\(textBytes.count) bytes) does not fit in its \(VMDKLayout.descriptorSectors) sectors", path: name)
        }
        try await file.writePadded(textBytes, at: VMDKLayout.descriptorOffset * Self.sector)
        if durable { try await file.flush() }
        // The header last: before it nothing reads as a VMDK image. It names the directory
        // itself, as qemu-img's do, rather than leave it to the footer (GD_AT_END): on a target
        // that cannot be cut to the image's size (an NBD export, a LUN) the footer is not at
        // the device's end, where a reader looks for it.
        try await file.writePadded(header(gdOffset: UInt64(gdSector)).bytes(), at: 0)
        if durable { try await file.flush() }
        state.withLock { s in
            s.markerOnDisk = false
            s.used = end
        }
    }

    func close() async throws {
        var firstError: (any Error)?
        do { try await file.close() } catch { firstError = error }
        if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
        if let firstError { throw firstError }
    }
}
