import FerryCore
#if canImport(Glibc)
import Glibc
#endif

/// The `-o` options of a new VMDK image, checked together before anything is created,
/// with qemu-img's rules.
struct VMDKCreateOptions: Sendable {
    enum Subformat: String, Sendable {
        case monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized

        var isFlat: Bool { self == .monolithicFlat || self == .twoGbMaxExtentFlat }
        var isSplit: Bool { self == .twoGbMaxExtentSparse || self == .twoGbMaxExtentFlat }
    }

    var subformat: Subformat = .monolithicSparse
    var adapterType = "ide"
    var hwVersion = "4"
    var toolsVersion = "2147483647"
    var zeroedGrain = false
    var backingFile: String?
    var backingFormat: String?

    static let adapterTypes = ["ide", "lsilogic", "buslogic", "legacyESX"]

    static func bad(_ message: String) -> FerryError { FerryError(.invalidArgument, message) }

    /// qemu's boolean option values.
    static func onOff(_ options: [String: String], _ key: String) throws -> Bool {
        guard let v = options[key] else { return false }
        switch v {
        case "on", "true", "yes": return true
        case "off", "false", "no": return false
        default: throw bad("invalid value '\(v)' for \(key) (allowed: on, off)")
        }
    }

    init(_ options: [String: String]) throws {
        if let s = options["subformat"] {
            guard let v = Subformat(rawValue: s) else {
                throw Self.bad("invalid subformat '\(s)' (allowed: \(VMDKFormat.subformats.joined(separator: ", ")))")
            }
            subformat = v
        }
        if let a = options["adapter_type"] {
            guard Self.adapterTypes.contains(a) else {
                throw Self.bad("invalid adapter_type '\(a)' (allowed: \(Self.adapterTypes.joined(separator: ", ")))")
            }
            adapterType = a
        }
        let compat6 = try Self.onOff(options, "compat6")
        zeroedGrain = try Self.onOff(options, "zeroed_grain")
        // qemu writes hwversion and toolsversion into the descriptor as given.
        if let h = options["hwversion"], h != "undefined" {
            if compat6 { throw Self.bad("compat6 cannot be enabled with hwversion set") }
            guard !h.isEmpty, !h.contains("\""), !h.contains("\n") else { throw Self.bad("invalid hwversion '\(h)'") }
            hwVersion = h
        } else if compat6 {
            hwVersion = "6"
        }
        if let t = options["toolsversion"] {
            guard !t.isEmpty, !t.contains("\""), !t.contains("\n") else { throw Self.bad("invalid toolsversion '\(t)'") }
            toolsVersion = t
        }
        backingFile = options["backing_file"].flatMap { $0.isEmpty ? nil : $0 }
        backingFormat = options["backing_fmt"].flatMap { $0.isEmpty ? nil : $0 }
        if subformat.isFlat {
            if backingFile != nil { throw Self.bad("a flat image (\(subformat.rawValue)) cannot have a backing file") }
            if zeroedGrain { throw Self.bad("a flat image (\(subformat.rawValue)) cannot enable zeroed_grain") }
        }
        if let f = backingFormat, f != VMDKFormat.name {
            throw Self.bad("backing_fmt must be vmdk: a vmdk image's backing file must be a vmdk image, not \(f)")
        }
        if let b = backingFile, b.contains("\"") || b.contains("\n") {
            throw Self.bad("invalid backing_file '\(b)' (it is written in quotes in the descriptor)")
        }
    }

    static func check(_ options: [String: String]) throws {
        _ = try VMDKCreateOptions(options)
    }
}

/// Layout constants and the pieces every VMDK subformat shares: the sparse extent header,
/// the descriptor text, extent file names.
enum VMDKLayout {
    static let sector: Int64 = 512
    static let grainSectors: Int64 = 128
    static let grainSize: Int64 = 64 << 10
    static let gtEntries: Int64 = 512
    /// Sectors for one grain table (512 entries of 4 bytes).
    static let gtSectors: Int64 = 4
    /// Guest bytes one grain table covers (32 MiB).
    static let gtCoverage: Int64 = grainSize * gtEntries
    /// Where qemu and VMware put the embedded descriptor, and its size.
    static let descriptorOffset: Int64 = 1
    static let descriptorSectors: Int64 = 20
    /// Size of each extent of the twoGbMaxExtent subformats (qemu: 2 GiB).
    static let splitSize: Int64 = 2 << 30

    static let flagNewlineDetect: UInt32 = 1 << 0
    static let flagRedundantGD: UInt32 = 1 << 1
    static let flagZeroedGrain: UInt32 = 1 << 2
    static let flagCompressed: UInt32 = 1 << 16
    static let flagMarkers: UInt32 = 1 << 17
    static let gdAtEnd: UInt64 = .max

    static func sectors(_ bytes: Int64) -> Int64 { (bytes + sector - 1) / sector }

    /// Where the metadata of a sparse extent of `capacity` sectors lies (qemu's and
    /// VMware's order: header, descriptor, redundant GD and its GTs, GD and its GTs, then
    /// grains from `overhead` on). All in sectors.
    struct Sparse: Equatable {
        var capacity: Int64
        var tables: Int64
        var gdSectors: Int64
        var rgdOffset: Int64
        var gdOffset: Int64
        var overhead: Int64

        init(capacity: Int64) {
            self.capacity = capacity
            let grains = (capacity + VMDKLayout.grainSectors - 1) / VMDKLayout.grainSectors
            tables = (grains + VMDKLayout.gtEntries - 1) / VMDKLayout.gtEntries
            gdSectors = VMDKLayout.sectors(tables * 4)
            rgdOffset = VMDKLayout.descriptorOffset + VMDKLayout.descriptorSectors
            gdOffset = rgdOffset + gdSectors + tables * VMDKLayout.gtSectors
            let end = gdOffset + gdSectors + tables * VMDKLayout.gtSectors
            overhead = (end + VMDKLayout.grainSectors - 1) / VMDKLayout.grainSectors * VMDKLayout.grainSectors
        }

        /// Sector of grain table `i` of the GD (`redundant`: of the redundant GD).
        func table(_ i: Int, redundant: Bool) -> Int64 {
            (redundant ? rgdOffset : gdOffset) + gdSectors + Int64(i) * VMDKLayout.gtSectors
        }
    }

    /// The 512-byte sparse extent header (little-endian), as the specification lays it out.
    struct Header {
        var version: UInt32
        var flags: UInt32
        var capacity: Int64
        var descriptorOffset: Int64
        var descriptorSectors: Int64
        var rgdOffset: Int64
        var gdOffset: UInt64
        var overhead: Int64
        var compressAlgorithm: UInt16 = 0

        func encode(into p: UnsafeMutableRawBufferPointer) {
            precondition(p.count >= 512)
            p.initializeMemory(as: UInt8.self, repeating: 0)
            p.copyBytes(from: Array("KDMV".utf8))
            p.storeBytes(of: version.littleEndian, toByteOffset: 4, as: UInt32.self)
            p.storeBytes(of: flags.littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: UInt64(capacity).littleEndian, toByteOffset: 12, as: UInt64.self)
            p.storeBytes(of: UInt64(VMDKLayout.grainSectors).littleEndian, toByteOffset: 20, as: UInt64.self)
            p.storeBytes(of: UInt64(descriptorOffset).littleEndian, toByteOffset: 28, as: UInt64.self)
            p.storeBytes(of: UInt64(descriptorSectors).littleEndian, toByteOffset: 36, as: UInt64.self)
            p.storeBytes(of: UInt32(VMDKLayout.gtEntries).littleEndian, toByteOffset: 44, as: UInt32.self)
            p.storeBytes(of: UInt64(rgdOffset).littleEndian, toByteOffset: 48, as: UInt64.self)
            p.storeBytes(of: gdOffset.littleEndian, toByteOffset: 56, as: UInt64.self)
            p.storeBytes(of: UInt64(overhead).littleEndian, toByteOffset: 64, as: UInt64.self)
            p[72] = 0 // uncleanShutdown
            // The newline characters that let a reader detect a file mangled by text transfer.
            p[73] = 0x0A
            p[74] = 0x20
            p[75] = 0x0D
            p[76] = 0x0A
            p.storeBytes(of: compressAlgorithm.littleEndian, toByteOffset: 77, as: UInt16.self)
        }

        func bytes() -> [UInt8] {
            var out = [UInt8](repeating: 0, count: 512)
            out.withUnsafeMutableBytes { encode(into: $0) }
            return out
        }
    }

    /// The name of extent `index` (1-based) of an image at `location`, as qemu names them:
    /// `disk.vmdk` -> `disk-flat.vmdk`, `disk-s001.vmdk`, `disk-f001.vmdk`.
    static func extentName(_ location: String, suffix: String) -> String {
        let base = location.split(separator: "/", omittingEmptySubsequences: false).last.map(String.init) ?? location
        if let dot = base.lastIndex(of: "."), dot != base.startIndex {
            return String(base[..<dot]) + "-" + suffix + String(base[dot...])
        }
        return base + "-" + suffix
    }

    /// `name` next to the image at `location`.
    static func sibling(_ name: String, of location: String) -> String {
        guard let slash = location.lastIndex(of: "/") else { return name }
        return String(location[...slash]) + name
    }

    /// The descriptor text, laid out as qemu writes it.
    static func descriptor(cid: UInt32, parentCID: UInt32, createType: String, parentHint: String?,
                           extents: [String], sizeSectors: Int64, options o: VMDKCreateOptions) -> String {
        let heads: Int64 = o.adapterType == "ide" ? 16 : 255
        // qemu 7.2 does not cap the cylinders at 16383.
        let cylinders = sizeSectors / (heads * 63)
        var s = "# Disk DescriptorFile\nversion=1\n"
        s += "CID=\(hex8(cid))\nparentCID=\(hex8(parentCID))\ncreateType=\"\(createType)\"\n"
        s += parentHint.map { "parentFileNameHint=\"\($0)\"\n" } ?? "\n"
        s += "# Extent description\n"
        for e in extents { s += e + "\n" }
        s += "\n# The Disk Data Base\n#DDB\n\n"
        s += "ddb.virtualHWVersion = \"\(o.hwVersion)\"\n"
        s += "ddb.geometry.cylinders = \"\(cylinders)\"\n"
        s += "ddb.geometry.heads = \"\(heads)\"\n"
        s += "ddb.geometry.sectors = \"63\"\n"
        s += "ddb.adapterType = \"\(o.adapterType)\"\n"
        s += "ddb.toolsVersion = \"\(o.toolsVersion)\"\n"
        return s
    }

    static func hex8(_ v: UInt32) -> String {
        let h = String(v, radix: 16)
        return String(repeating: "0", count: 8 - h.count) + h
    }

    /// A new content ID (qemu also picks a random one).
    static func newCID() -> UInt32 {
        var v = UInt32.random(in: 0 ... UInt32.max)
        if v == 0xFFFF_FFFF { v = 0xFFFF_FFFE }
        return v
    }
}

extension BlockDevice {
    /// Writes small metadata at `offset` (a sector boundary), padded with zeros to whole
    /// sectors: every VMDK structure fills whole sectors, so the padding never reaches the
    /// next one (padding to a larger block could wipe a neighbour).
    func writePadded(_ bytes: [UInt8], at offset: Int64) async throws {
        let align = Int(VMDKLayout.sector)
        let buffer = AlignedBuffer(count: max(align, (bytes.count + align - 1) / align * align))
        buffer.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
        bytes.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: buffer.mutableBytes[0 ..< bytes.count]).copyMemory(from: $0) }
        let n = Int(min(Int64(buffer.count), size - offset))
        try await write(at: offset, from: UnsafeRawBufferPointer(rebasing: buffer.bytes[0 ..< n]), flags: [])
    }
}

/// Writes new VMDK images: sparse extents (`VMDKSparseWriter`), flat extents
/// (`VMDKFlatWriter`) or a stream (`VMDKStreamWriter`).
enum VMDKWriter {
    /// Sparse extents address grains with 32-bit sector numbers.
    static let maxSparseFile: Int64 = Int64(UInt32.max) * VMDKLayout.sector

    static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        let o = try VMDKCreateOptions(options)
        let capacity = VMDKLayout.sectors(size)
        let grains = (size + VMDKLayout.grainSize - 1) / VMDKLayout.grainSize
        switch o.subformat {
        case .monolithicSparse:
            // Every grain once (a grain is allocated once and rewritten in place). Sparse, and
            // cut to what is used at the end.
            let l = VMDKLayout.Sparse(capacity: capacity)
            return min(maxSparseFile, l.overhead * VMDKLayout.sector + grains * VMDKLayout.grainSize)
        case .streamOptimized:
            // Header grain, every grain with its marker (a grain that does not shrink grows
            // by a few bytes), the tables with theirs, GD, footer and end-of-stream marker.
            let tables = (grains + VMDKLayout.gtEntries - 1) / VMDKLayout.gtEntries
            return VMDKLayout.grainSize + grains * (VMDKLayout.grainSize + 1024)
                + tables * (VMDKLayout.gtSectors + 1) * VMDKLayout.sector + (VMDKLayout.sectors(tables * 4) + 4) * VMDKLayout.sector
        case .monolithicFlat, .twoGbMaxExtentFlat, .twoGbMaxExtentSparse:
            // The descriptor file; cut to its text at the end.
            let extents = max(1, (size + VMDKLayout.splitSize - 1) / VMDKLayout.splitSize)
            return (4096 + extents * 128 + 65535) / 65536 * 65536
        }
    }

    static func create(file: any BlockDevice, size: Int64, options: [String: String],
                       context: CreateContext) async throws -> any BlockDevice {
        let o = try VMDKCreateOptions(options)
        if o.backingFile != nil, let f = context.backingFormat, f != VMDKFormat.name {
            throw FerryError(.invalidArgument, "backing file '\(o.backingFile!)' is a \(f) image; a vmdk image's backing file must be a vmdk image", path: context.location)
        }
        var parentCID: UInt32 = 0xFFFF_FFFF
        if let b = o.backingFile {
            guard let parent = context.backing as? VMDKReadDevice else {
                throw FerryError(.invalidArgument, "could not read the CID of the backing file '\(b)'", path: context.location)
            }
            parentCID = parent.cid
        }
        switch o.subformat {
        case .monolithicSparse, .twoGbMaxExtentSparse:
            return try await VMDKSparseWriter.create(file: file, size: size, options: o, parentCID: parentCID, context: context)
        case .monolithicFlat, .twoGbMaxExtentFlat:
            return try await VMDKFlatWriter.create(file: file, size: size, options: o, context: context)
        case .streamOptimized:
            return try await VMDKStreamWriter.create(file: file, size: size, options: o, parentCID: parentCID, context: context)
        }
    }
}
