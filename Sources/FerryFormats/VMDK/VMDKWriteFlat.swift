import FerryCore

/// A new monolithicFlat or twoGbMaxExtentFlat image: the descriptor in the image's file,
/// the guest bytes as they are in `NAME-flat.vmdk` or `NAME-f001.vmdk`, `-f002`, ... (2 GiB
/// each). Reads and writes go straight to the extent that holds them.
///
/// The descriptor is written at `commit`: until then the image's file holds no descriptor,
/// so an interrupted copy never looks like a VMDK image.
final class VMDKFlatWriter: CommittingDevice, @unchecked Sendable {
    struct ExtentFile {
        let file: any BlockDevice
        let start: Int64
        let length: Int64
        let fileName: String
    }

    let name: String
    let size: Int64
    let descriptorFile: any BlockDevice
    let extents: [ExtentFile]
    let opts: VMDKCreateOptions
    let cid = VMDKLayout.newCID()
    private let used = Locked<Int64>(0)

    init(name: String, size: Int64, descriptorFile: any BlockDevice, extents: [ExtentFile], opts: VMDKCreateOptions) {
        self.name = name
        self.size = size
        self.descriptorFile = descriptorFile
        self.extents = extents
        self.opts = opts
    }

    static func create(file: any BlockDevice, size: Int64, options: VMDKCreateOptions,
                       context: CreateContext) async throws -> VMDKFlatWriter {
        var extents: [ExtentFile] = []
        let split = options.subformat.isSplit
        let pieces = split ? max(1, (size + VMDKLayout.splitSize - 1) / VMDKLayout.splitSize) : 1
        do {
            for k in 0 ..< pieces {
                let start = k * VMDKLayout.splitSize
                let length = split ? min(VMDKLayout.splitSize, size - start) : size
                let fileName = VMDKLayout.extentName(context.location, suffix: split ? "f" + pad3(Int(k) + 1) : "flat")
                let device = try await context.createFile(VMDKLayout.sibling(fileName, of: context.location),
                                                          VMDKLayout.sectors(length) * VMDKLayout.sector)
                extents.append(ExtentFile(file: device, start: start, length: length, fileName: fileName))
            }
        } catch {
            for e in extents { try? await e.file.close() }
            throw error
        }
        // Nothing that reads as a descriptor until commit (the file may be an old device).
        try await file.writePadded([UInt8](repeating: 0, count: 512), at: 0)
        return VMDKFlatWriter(name: context.location, size: size, descriptorFile: file, extents: extents, opts: options)
    }

    var limits: BlockLimits {
        let align = extents.map(\.file.limits.alignment).max() ?? 1
        let maxT = extents.map(\.file.limits.maximumTransfer).min() ?? (32 << 20)
        return BlockLimits(alignment: align, preferredTransfer: max(align, 1 << 20), maximumTransfer: maxT)
    }

    var capabilities: BlockCapabilities {
        var c: BlockCapabilities = [.write, .flush, .zeroInit]
        if extents.allSatisfy({ $0.file.capabilities.contains(.zero) }) { c.insert(.zero) }
        if extents.allSatisfy({ $0.file.capabilities.contains(.anyWriteOrder) }) { c.insert(.anyWriteOrder) }
        return c
    }

    var usedFileSize: Int64 { used.withLock { $0 } }

    /// The pieces of `offset ..< offset + length` in each extent: (extent, offset in it, from, count).
    private func pieces(_ offset: Int64, _ length: Int64) -> [(ExtentFile, Int64, Int, Int)] {
        var out: [(ExtentFile, Int64, Int, Int)] = []
        var pos = offset
        let end = offset + length
        var k = opts.subformat.isSplit ? Int(offset / VMDKLayout.splitSize) : 0
        while pos < end && k < extents.count {
            let e = extents[k]
            let n = min(end, e.start + e.length) - pos
            if n > 0 { out.append((e, pos - e.start, Int(pos - offset), Int(n))) }
            pos += max(n, 0)
            k += 1
        }
        return out
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        for (e, at, from, n) in pieces(offset, Int64(buffer.count)) {
            try await e.file.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: buffer[from ..< from + n]))
        }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        try checkRange(offset, Int64(buffer.count))
        for (e, at, from, n) in pieces(offset, Int64(buffer.count)) {
            try await e.file.write(at: at, from: UnsafeRawBufferPointer(rebasing: buffer[from ..< from + n]), flags: flags)
        }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkRange(offset, length)
        for (e, at, _, n) in pieces(offset, length) {
            try await e.file.writeZeroes(at: at, length: Int64(n), flags: flags)
        }
    }

    func discard(at offset: Int64, length: Int64) async throws {}

    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }

    func flush() async throws {
        for e in extents { try await e.file.flush() }
    }

    func commit(durable: Bool) async throws {
        if durable { try await flush() }
        let lines = extents.map { "RW \(VMDKLayout.sectors($0.length)) FLAT \"\($0.fileName)\" 0" }
        let text = VMDKLayout.descriptor(cid: cid, parentCID: 0xFFFF_FFFF, createType: opts.subformat.rawValue, parentHint: nil,
                                         extents: lines, sizeSectors: VMDKLayout.sectors(size), options: opts)
        let bytes = Array(text.utf8)
        guard bytes.count <= descriptorFile.size else {
            throw FerryError(.noSpace, "the descriptor (\(bytes.count) bytes) does not fit in the image file", path: name)
        }
        try await descriptorFile.writePadded(bytes, at: 0)
        if durable { try await descriptorFile.flush() }
        used.withLock { $0 = Int64(bytes.count) }
    }

    func close() async throws {
        var firstError: (any Error)?
        for e in extents { do { try await e.file.close() } catch { firstError = firstError ?? error } }
        do { try await descriptorFile.close() } catch { firstError = firstError ?? error }
        if let firstError { throw firstError }
    }
}

/// `7` -> `007`, as qemu numbers extent files.
func pad3(_ n: Int) -> String {
    let s = String(n)
    return s.count >= 3 ? s : String(repeating: "0", count: 3 - s.count) + s
}
