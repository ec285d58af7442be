import FerryCore

/// Little-endian fields of VHDX structures.
struct VHDXBytes {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    func u8(_ at: Int) -> UInt8 { at >= 0 && at < bytes.count ? bytes[at] : 0 }
    func u16(_ at: Int) -> UInt16 { UInt16(u8(at)) | UInt16(u8(at + 1)) << 8 }
    func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) | UInt32(u16(at + 2)) << 16 }
    func u64(_ at: Int) -> UInt64 { UInt64(u32(at)) | UInt64(u32(at + 4)) << 32 }
    func guid(_ at: Int) -> VHDXGUID { VHDXGUID(bytes: (0 ..< 16).map { u8(at + $0) }) }
    func ascii(_ at: Int, _ n: Int) -> String { String(decoding: (0 ..< n).map { u8(at + $0) }, as: UTF8.self) }
}

/// A GUID as VHDX stores it (the first three fields little-endian).
struct VHDXGUID: Hashable, Sendable, CustomStringConvertible {
    let bytes: [UInt8]
    init(bytes: [UInt8]) { self.bytes = bytes }
    /// From the usual text form `8B7CA206-4790-4B9A-B8FE-575F050F886E`.
    init(_ text: String) {
        let hex = Array(text.utf8.filter { $0 != UInt8(ascii: "-") })
        var raw: [UInt8] = []
        var i = 0
        while i + 1 < hex.count {
            raw.append(UInt8(String(decoding: hex[i ... i + 1], as: UTF8.self), radix: 16)!)
            i += 2
        }
        bytes = [raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6]] + raw[8 ..< 16]
    }
    var isZero: Bool { bytes.allSatisfy { $0 == 0 } }
    var description: String {
        func h(_ b: [UInt8]) -> String { b.map { String($0, radix: 16, uppercase: true).count == 1 ? "0" + String($0, radix: 16, uppercase: true) : String($0, radix: 16, uppercase: true) }.joined() }
        return h([bytes[3], bytes[2], bytes[1], bytes[0]]) + "-" + h([bytes[5], bytes[4]]) + "-" + h([bytes[7], bytes[6]])
            + "-" + h(Array(bytes[8 ..< 10])) + "-" + h(Array(bytes[10 ..< 16]))
    }
}

/// The fixed layout of a VHDX file and the identifiers of what it holds ([MS-VHDX] 2.2–2.6).
enum VHDXLayout {
    static let headerOffsets: [Int64] = [64 << 10, 128 << 10]
    static let headerBytes = 4096
    static let regionTableOffsets: [Int64] = [192 << 10, 256 << 10]
    static let regionTableBytes = 64 << 10
    static let maxRegionEntries: UInt32 = 2047
    static let metadataTableBytes = 64 << 10
    static let maxMetadataEntries: UInt16 = 2047
    static let mib: Int64 = 1 << 20

    static let batRegion = VHDXGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
    static let metadataRegion = VHDXGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

    static let fileParameters = VHDXGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
    static let virtualDiskSize = VHDXGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    static let virtualDiskID = VHDXGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
    static let logicalSectorSize = VHDXGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
    static let physicalSectorSize = VHDXGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
    static let parentLocator = VHDXGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
    static let vhdxParentLocatorType = VHDXGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")

    /// Payload block states (BAT entry bits 0–2).
    static let notPresent: UInt64 = 0, undefined: UInt64 = 1, zero: UInt64 = 2, unmapped: UInt64 = 3
    static let fullyPresent: UInt64 = 6, partiallyPresent: UInt64 = 7
    /// Sector bitmap block state: present.
    static let bitmapPresent: UInt64 = 6
    /// Largest virtual size (64 TiB), and most bytes of log Ferry reads to check it is empty.
    static let maxVirtualSize: UInt64 = 64 << 40
    static let maxLogBytes: UInt64 = 256 << 20
}

/// Reads `count` bytes at `offset` (zeros past the end of the file).
func vhdxReadBytes(_ file: any BlockDevice, at offset: Int64, count: Int) async throws -> [UInt8] {
    guard count > 0 else { return [] }
    let buffer = AlignedBuffer(count: count)
    try await readHost(file, at: offset, into: buffer.mutableBytes)
    return Array(buffer.bytes)
}

/// What the headers, region table and metadata of a VHDX file say.
struct VHDXParsed: Sendable {
    var sequence: UInt64
    var dataWriteGuid: VHDXGUID
    var batOffset: Int64
    var batLength: Int64
    var blockSize: Int64
    var logicalSector: Int64
    var physicalSector: Int64
    var virtualSize: Int64
    var hasParent: Bool
    var leaveBlocksAllocated: Bool
    var parentEntries: [(key: String, value: String)] = []
    /// Where the parent locator item is in the file (for messages).
    var parentLocatorOffset: Int64 = 0
    var chunkRatio: Int64 { (Int64(1) << 23) * logicalSector / blockSize }
    var payloadBlocks: Int64 { (virtualSize + blockSize - 1) / blockSize }
    /// BAT entries the image needs ([MS-VHDX] 2.5.1).
    var batEntries: Int64 {
        let n = payloadBlocks
        if hasParent { return (n + chunkRatio - 1) / chunkRatio * (chunkRatio + 1) }
        return n == 0 ? 0 : n + (n - 1) / chunkRatio
    }
}

/// Opens VHDX images for reading.
enum VHDXReader {
    static func corrupt(_ what: String, _ path: String, _ offset: Int64) -> FerryError {
        FerryError(.corrupt, "vhdx " + what, path: path, offset: offset)
    }

    static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        guard context.readOnly else {
            throw FerryError(.notSupported, "existing vhdx images can only be read in this version of ferry", path: path)
        }
        let parsed = try await parse(file, path: path)
        // The BAT, read whole: its size was checked against the file.
        let bat = try await readBAT(file, parsed, path: path)
        var details = ImageDetails()
        details.clusterSize = Int(parsed.blockSize)
        var backing: (any BlockDevice)?
        if parsed.hasParent {
            let (stored, location) = try parentLocation(parsed.parentEntries, path: path, at: parsed.parentLocatorOffset)
            details.backingFilename = stored
            details.fullBackingFilename = location
            details.backingFormat = VHDXFormat.name
            if context.opensBacking {
                backing = try await context.openBacking(location, VHDXFormat.name, context.depth + 1)
                if let parent = backing as? VHDXReadDevice,
                   let linkage = parsed.parentEntries.first(where: { $0.key == "parent_linkage" })?.value,
                   parent.dataWriteGuid.description.lowercased() != String(linkage.filter { $0 != "{" && $0 != "}" }).lowercased() {
                    try? await parent.close()
                    throw FerryError(.corrupt, "vhdx parent '\(location)' has DataWriteGuid {\(parent.dataWriteGuid)}, but this image's parent_linkage is \(linkage.prefix(40))",
                                     path: path)
                }
            }
        }
        return VHDXReadDevice(name: path, file: file, parsed: parsed, bat: bat, backing: backing, details: details)
    }

    /// Headers (the valid one with the higher sequence number), region table, log state,
    /// metadata; every field checked before use.
    static func parse(_ file: any BlockDevice, path: String) async throws -> VHDXParsed {
        guard file.size >= 320 << 10 else {
            throw corrupt("file is truncated: \(file.size) bytes, fewer than the headers and region tables take (327680)", path, file.size)
        }
        let ident = VHDXBytes(try await vhdxReadBytes(file, at: 0, count: 8))
        guard ident.ascii(0, 8) == "vhdxfile" else { throw corrupt("file has no 'vhdxfile' signature", path, 0) }

        // Headers.
        var best: (VHDXBytes, Int64)?
        var why: [String] = []
        for at in VHDXLayout.headerOffsets {
            let raw = try await vhdxReadBytes(file, at: at, count: VHDXLayout.headerBytes)
            let h = VHDXBytes(raw)
            guard h.ascii(0, 4) == "head" else { why.append("no 'head' signature at offset \(at)"); continue }
            let sum = VHDXCRC.checksum(raw, zeroingAt: 4)
            guard sum == h.u32(4) else { why.append("bad checksum at offset \(at)"); continue }
            if best == nil || h.u64(8) > best!.0.u64(8) { best = (h, at) }
        }
        guard let (header, headerAt) = best else {
            throw corrupt("has no valid header (\(why.joined(separator: "; ")))", path, VHDXLayout.headerOffsets[0])
        }
        guard header.u16(66) == 1 else {
            throw FerryError(.notSupported, "vhdx header version \(header.u16(66)) is not supported", path: path, offset: headerAt + 66)
        }

        // Region table: the first valid copy.
        var region: VHDXBytes?
        var regionAt: Int64 = 0
        for at in VHDXLayout.regionTableOffsets {
            let raw = try await vhdxReadBytes(file, at: at, count: VHDXLayout.regionTableBytes)
            let r = VHDXBytes(raw)
            if r.ascii(0, 4) == "regi", VHDXCRC.checksum(raw, zeroingAt: 4) == r.u32(4), r.u32(8) <= VHDXLayout.maxRegionEntries {
                region = r
                regionAt = at
                break
            }
        }
        guard let region else {
            throw corrupt("region table has no valid copy (bad signature, checksum or entry count)", path, VHDXLayout.regionTableOffsets[0])
        }
        var bat: (Int64, Int64)?
        var meta: (Int64, Int64)?
        for i in 0 ..< Int(region.u32(8)) {
            let e = 16 + i * 32
            let id = region.guid(e)
            let offset = region.u64(e + 16)
            let length = UInt64(region.u32(e + 24))
            let required = region.u32(e + 28) & 1 != 0
            let at = regionAt + Int64(e)
            guard id == VHDXLayout.batRegion || id == VHDXLayout.metadataRegion else {
                if required { throw FerryError(.notSupported, "vhdx region {\(id)} is required but not known", path: path, offset: at) }
                continue
            }
            guard offset % UInt64(VHDXLayout.mib) == 0, offset >= UInt64(VHDXLayout.mib), length % UInt64(VHDXLayout.mib) == 0, length > 0,
                  offset < UInt64(file.size), length <= UInt64(file.size) - offset else {
                throw corrupt("region {\(id)} at file offset \(offset) (\(length) bytes) is misaligned or past the end of the file (\(file.size) bytes)", path, at)
            }
            if id == VHDXLayout.batRegion { bat = (Int64(offset), Int64(length)) } else { meta = (Int64(offset), Int64(length)) }
        }
        guard let bat else { throw corrupt("region table has no BAT region", path, regionAt) }
        guard let meta else { throw corrupt("region table has no metadata region", path, regionAt) }

        try await checkLog(file, header: header, headerAt: headerAt, path: path)

        var p = try await parseMetadata(file, at: meta.0, length: meta.1, path: path)
        p.sequence = header.u64(8)
        p.dataWriteGuid = header.guid(32)
        p.batOffset = bat.0
        p.batLength = bat.1
        guard UInt64(p.batEntries) <= UInt64(bat.1) / 8 else {
            throw corrupt("BAT region of \(bat.1) bytes is too small for \(p.batEntries) entries", path, bat.0)
        }
        return p
    }

    /// A log whose GUID is set may hold entries that were not yet written to their places:
    /// reading past them would give stale data. Ferry does not replay a log (that changes the
    /// file); it refuses an image whose log holds a valid entry.
    static func checkLog(_ file: any BlockDevice, header: VHDXBytes, headerAt: Int64, path: String) async throws {
        let guid = header.guid(48)
        guard !guid.isZero else { return }
        let length = UInt64(header.u32(68))
        let offset = header.u64(72)
        guard offset % UInt64(VHDXLayout.mib) == 0, offset >= UInt64(VHDXLayout.mib), length % UInt64(VHDXLayout.mib) == 0,
              offset < UInt64(file.size), length <= UInt64(file.size) - offset else {
            throw corrupt("log at file offset \(offset) (\(length) bytes) is misaligned or past the end of the file", path, headerAt + 68)
        }
        guard length <= VHDXLayout.maxLogBytes else {
            throw FerryError(.notSupported, "vhdx log of \(length) bytes is larger than Ferry checks (\(VHDXLayout.maxLogBytes))", path: path, offset: headerAt + 68)
        }
        let log = try await vhdxReadBytes(file, at: Int64(offset), count: Int(length))
        let n = log.count
        var at = 0
        while at + 64 <= n {
            defer { at += 4096 }
            let e = VHDXBytes(Array(log[at ..< at + 64]))
            guard e.ascii(0, 4) == "loge", e.guid(32) == guid else { continue }
            let entryLength = Int(e.u32(8))
            guard entryLength >= 4096, entryLength % 4096 == 0, entryLength <= n else { continue }
            // An entry may wrap around the end of the circular log.
            var entry = [UInt8](repeating: 0, count: entryLength)
            for i in 0 ..< entryLength { entry[i] = log[(at + i) % n] }
            guard VHDXCRC.checksum(entry, zeroingAt: 4) == e.u32(4) else { continue }
            throw FerryError(.notSupported,
                             "vhdx log at file offset \(Int(offset) + at) holds entries that were not replayed (the image was not closed cleanly); Ferry does not replay logs: run 'qemu-img check -r all' on it first",
                             path: path, offset: Int64(offset) + Int64(at))
        }
    }

    static func parseMetadata(_ file: any BlockDevice, at regionOffset: Int64, length regionLength: Int64,
                              path: String) async throws -> VHDXParsed {
        let table = VHDXBytes(try await vhdxReadBytes(file, at: regionOffset, count: VHDXLayout.metadataTableBytes))
        guard table.ascii(0, 8) == "metadata" else { throw corrupt("metadata table has no 'metadata' signature", path, regionOffset) }
        let count = table.u16(10)
        guard count <= VHDXLayout.maxMetadataEntries else {
            throw corrupt("metadata table has \(count) entries, more than 2047", path, regionOffset + 10)
        }
        var items: [VHDXGUID: (offset: Int64, bytes: VHDXBytes)] = [:]
        let sizes: [VHDXGUID: Int] = [VHDXLayout.fileParameters: 8, VHDXLayout.virtualDiskSize: 8, VHDXLayout.virtualDiskID: 16,
                                      VHDXLayout.logicalSectorSize: 4, VHDXLayout.physicalSectorSize: 4]
        for i in 0 ..< Int(count) {
            let e = 32 + i * 32
            let id = table.guid(e)
            let offset = Int64(table.u32(e + 16))
            let length = Int64(table.u32(e + 20))
            let required = table.u32(e + 24) & 4 != 0
            let at = regionOffset + Int64(e)
            guard sizes[id] != nil || id == VHDXLayout.parentLocator else {
                if required { throw FerryError(.notSupported, "vhdx metadata item {\(id)} is required but not known", path: path, offset: at) }
                continue
            }
            guard offset >= Int64(VHDXLayout.metadataTableBytes), length <= regionLength - offset else {
                throw corrupt("metadata item {\(id)} at region offset \(offset) (\(length) bytes) lies outside the metadata region", path, at)
            }
            if let want = sizes[id], Int(length) != want {
                throw corrupt("metadata item {\(id)} is \(length) bytes, not \(want)", path, at + 20)
            }
            items[id] = (regionOffset + offset, VHDXBytes(try await vhdxReadBytes(file, at: regionOffset + offset, count: Int(length))))
        }
        func item(_ id: VHDXGUID, _ what: String) throws -> (offset: Int64, bytes: VHDXBytes) {
            guard let i = items[id] else { throw corrupt("metadata has no \(what) item", path, regionOffset) }
            return i
        }
        let params = try item(VHDXLayout.fileParameters, "file parameters")
        let blockSize = Int64(params.bytes.u32(0))
        guard blockSize >= VHDXLayout.mib, blockSize <= 256 * VHDXLayout.mib, blockSize & (blockSize - 1) == 0 else {
            throw corrupt("block size \(blockSize) is not a power of two from 1 MiB to 256 MiB", path, params.offset)
        }
        let flags = params.bytes.u32(4)
        let logical = try item(VHDXLayout.logicalSectorSize, "logical sector size")
        let lss = Int64(logical.bytes.u32(0))
        guard lss == 512 || lss == 4096 else { throw corrupt("logical sector size \(lss) is neither 512 nor 4096", path, logical.offset) }
        let physical = try item(VHDXLayout.physicalSectorSize, "physical sector size")
        let pss = Int64(physical.bytes.u32(0))
        guard pss == 512 || pss == 4096 else { throw corrupt("physical sector size \(pss) is neither 512 nor 4096", path, physical.offset) }
        let vs = try item(VHDXLayout.virtualDiskSize, "virtual disk size")
        let size = vs.bytes.u64(0)
        guard size > 0, size <= VHDXLayout.maxVirtualSize, size % UInt64(lss) == 0 else {
            throw corrupt("virtual disk size \(size) is not a multiple of the logical sector size up to 64 TiB", path, vs.offset)
        }
        _ = try item(VHDXLayout.virtualDiskID, "virtual disk ID")
        var p = VHDXParsed(sequence: 0, dataWriteGuid: VHDXGUID(bytes: Array(repeating: 0, count: 16)), batOffset: 0, batLength: 0,
                           blockSize: blockSize, logicalSector: lss, physicalSector: pss, virtualSize: Int64(size),
                           hasParent: flags & 2 != 0, leaveBlocksAllocated: flags & 1 != 0)
        if p.hasParent {
            let loc = try item(VHDXLayout.parentLocator, "parent locator (the file parameters say it has a parent)")
            p.parentEntries = try parseLocator(loc.bytes, at: loc.offset, path: path)
            p.parentLocatorOffset = loc.offset
        }
        return p
    }

    /// The parent locator's key/value pairs (UTF-16LE strings).
    static func parseLocator(_ b: VHDXBytes, at offset: Int64, path: String) throws -> [(key: String, value: String)] {
        let length = b.bytes.count
        guard length >= 20 else { throw corrupt("parent locator is \(length) bytes, too short", path, offset) }
        guard b.guid(0) == VHDXLayout.vhdxParentLocatorType else {
            throw FerryError(.notSupported, "vhdx parent locator type {\(b.guid(0))} is not the VHDX one", path: path, offset: offset)
        }
        let count = Int(b.u16(18))
        guard 20 + count * 12 <= length else { throw corrupt("parent locator's \(count) entries do not fit in its \(length) bytes", path, offset + 18) }
        func text(_ at: Int, _ n: Int, _ field: Int) throws -> String {
            guard at >= 20 + count * 12, n % 2 == 0, at <= length, n <= length - at else {
                throw corrupt("parent locator entry \(field) points outside the locator", path, offset + 20 + Int64(field) * 12)
            }
            let units = (0 ..< n / 2).map { b.u16(at + $0 * 2) }
            return String(decoding: units, as: UTF16.self)
        }
        var out: [(key: String, value: String)] = []
        for i in 0 ..< count {
            let e = 20 + i * 12
            out.append((try text(Int(b.u32(e)), Int(b.u16(e + 8)), i), try text(Int(b.u32(e + 4)), Int(b.u16(e + 10)), i)))
        }
        return out
    }

    /// The parent's location from the locator: only `relative_path`, resolved against the
    /// image's folder, and only when it stays in that folder or below (no `..`, no absolute
    /// or drive path). Absolute `absolute_win32_path` and `volume_path` entries name places on
    /// the Windows host that wrote the image; Ferry does not follow them.
    static func parentLocation(_ entries: [(key: String, value: String)], path: String, at offset: Int64) throws -> (stored: String, location: String) {
        guard let rel = entries.first(where: { $0.key == "relative_path" })?.value, !rel.isEmpty else {
            let abs = entries.first { $0.key == "absolute_win32_path" || $0.key == "volume_path" }?.value
            throw FerryError(.notSupported, "vhdx parent locator has no relative_path" + (abs.map { " (only '\($0.prefix(200))', an absolute path Ferry does not follow)" } ?? ""), path: path, offset: offset)
        }
        var name = String(rel.map { $0 == "\\" ? "/" : $0 })
        let parts = name.split(separator: "/", omittingEmptySubsequences: false)
        let drive = name.count >= 2 && Array(name.utf8)[1] == UInt8(ascii: ":")
        if name.hasPrefix("/") || drive || name.contains("://") || parts.contains("..") || name.contains("\0") {
            throw corrupt("parent locator's relative_path '\(rel.prefix(200))' escapes the image's folder", path, offset)
        }
        while name.hasPrefix("./") { name.removeFirst(2) }
        return (rel, resolveRelative(name, to: path))
    }

    static func readBAT(_ file: any BlockDevice, _ p: VHDXParsed, path: String) async throws -> [UInt64] {
        let n = Int(p.batEntries)
        var out: [UInt64] = []
        out.reserveCapacity(n)
        var done = 0
        while done < n {
            let k = min(n - done, 1 << 17)
            let raw = AlignedBuffer(count: k * 8)
            try await readHost(file, at: p.batOffset + Int64(done) * 8, into: raw.mutableBytes)
            for i in 0 ..< k { out.append(UInt64(littleEndian: raw.bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))) }
            done += k
        }
        return out
    }
}
