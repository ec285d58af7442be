import FerryCore

/// qcow2 (versions 2 and 3): read by `QCOW2Device`, new images written by `QCOW2Writer`.
public enum QCOW2Format: ImageFormat {
    public static let name = "qcow2"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size"),
        ("compat", "Compatibility level (0.10 or 1.1)"),
        ("backing_file", "File name of a base image"),
        ("backing_fmt", "Image format of the base image"),
        ("cluster_size", "qcow2 cluster size"),
        ("compression_type", "Compression method used for image cluster compression (zlib, zstd)"),
        ("extended_l2", "Extended L2 tables"),
        ("lazy_refcounts", "Postpone refcount updates"),
        ("preallocation", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        ("refcount_bits", "Width of a reference count entry in bits"),
    ]
    public static let writable = true
    public static var hasInternalSnapshots: Bool { true }
    /// Bitmaps need compat 1.1 (version 3's autoclear bits and header extensions).
    public static func features(options: [String: String]) -> FormatFeatures {
        let v2 = ["0.10", "v2"].contains(options["compat"] ?? "")
        return v2 ? [.compression, .backingFile, .zeroRuns] : [.compression, .backingFile, .zeroRuns, .persistentBitmaps]
    }

    /// Versions 2 and 3 (version 1 is qemu's older `qcow`, which `Formats` names but does
    /// not read).
    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        header.count >= 8 && header.prefix(4).elementsEqual(QCOW2Header.magic)
            && !header[4 ..< 8].elementsEqual([0, 0, 0, 1])
    }

    /// An upper bound of the file a new image can grow to (sparse: nothing is allocated until
    /// written); after the last commit the file can be cut to `CommittingDevice.usedFileSize`.
    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        let opts = try QCOW2CreateOptions(options)
        guard size >= 0, size <= Int64(1) << 50 else {
            throw FerryError(.invalidArgument, "invalid size \(size) for a qcow2 image (at most 1 PiB)")
        }
        return QCOW2Writer.layout(size: size, opts: opts).fileSize
    }

    /// Checks `-o` options without creating anything.
    public static func checkOptions(_ options: [String: String]) throws {
        _ = try QCOW2CreateOptions(options)
    }

    /// Creates a new image in `file`; the context's backing image is the one named by the
    /// `backing_file` option (reads fall through to it, for partial-cluster writes).
    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        let opts = try QCOW2CreateOptions(options)
        return try await QCOW2Writer.create(name: file.name, file: file, size: size, opts: opts, backing: context.backing)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        guard !context.readOnly else { return try await openReadOnly(file: file, context: context) }
        throw FerryError(.notSupported, "qcow2 images can only be read in this version of ferry", path: path)
    }

    static func readBytes(_ file: any BlockDevice, at offset: Int64, count: Int) async throws -> [UInt8] {
        guard count > 0 else { return [] }
        let buffer = AlignedBuffer(count: count)
        try await readHost(file, at: offset, into: buffer.mutableBytes)
        return Array(buffer.bytes)
    }

    private static func openReadOnly(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        // The fixed header first, then the whole first cluster for the extensions.
        let first = try await readBytes(file, at: 0, count: Int(min(file.size, 112)))
        var probe = first
        if first.count >= 24 {
            let cb = BigEndianBytes(bytes: first).u32(20)
            if cb >= 9 && cb <= 21 {
                probe = try await readBytes(file, at: 0, count: Int(min(file.size, Int64(1) << Int64(cb))))
            }
        }
        var header = try QCOW2Header(probe, fileSize: file.size, path: path)
        let snapshots = try await readSnapshots(file, header: header, path: path)
        if let selector = context.snapshot {
            // A snapshot is read as the image would be with its L1 table and size.
            guard let sn = selector.pick(snapshots) else {
                throw FerryError(.notFound, "no snapshot with \(selector) in the image", path: path)
            }
            let cs = Int64(header.clusterSize)
            guard sn.l1Size >= 0, Int64(sn.l1Size) * 8 <= QCOW2Header.maxL1Bytes, sn.l1Size == 0 || (sn.l1Offset > 0 && sn.l1Offset % cs == 0
                  && sn.l1Offset <= file.size - Int64(sn.l1Size) * 8) else {
                throw FerryError(.corrupt, "qcow2 snapshot '\(sn.name)' has an L1 table of \(sn.l1Size) entries at \(sn.l1Offset), which is invalid or lies past the end of the file", path: path, offset: sn.l1Offset)
            }
            // As qemu-img, at the image's present size: what the snapshot's L1 table does
            // not cover (the image grew since) is unallocated.
            header.l1TableOffset = sn.l1Offset
            header.l1Size = sn.l1Size
        }

        // The active L1 table.
        var l1 = [UInt64](repeating: 0, count: header.l1Size)
        if header.l1Size > 0 {
            let raw = try await readBytes(file, at: header.l1TableOffset, count: header.l1Size * 8)
            raw.withUnsafeBytes { p in
                for i in 0 ..< header.l1Size {
                    l1[i] = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self))
                }
            }
        }

        let covering = Int((header.size + header.l2Coverage - 1) / header.l2Coverage)
        if l1.count < covering { l1 += [UInt64](repeating: 0, count: covering - l1.count) }

        var details = ImageDetails()
        details.clusterSize = header.clusterSize
        details.dirty = header.dirty
        details.snapshots = snapshots
        let bitmaps = try await readBitmaps(file, header: header, path: path)

        // External data file, then the backing image.
        var externalData: (any BlockDevice)?
        var backing: (any BlockDevice)?
        do {
            if header.hasDataFile, let name = header.dataFile {
                externalData = try await context.openFile(resolveRelative(name, to: path))
            }
            if let backingName = header.backingFile {
                let full = resolveRelative(backingName, to: path)
                details.backingFilename = backingName
                details.fullBackingFilename = full
                details.backingFormat = header.backingFormat
                if context.opensBacking {
                    backing = try await context.openBacking(full, header.backingFormat, context.depth + 1)
                }
            }
        } catch {
            if let externalData { try? await externalData.close() }
            throw error
        }
        details.formatSpecific = formatSpecific(header, bitmaps: bitmaps)
        if header.version >= 3 { details.persistentBitmaps = bitmaps }
        return QCOW2Device(name: path, header: header, file: file, externalData: externalData,
                           backing: backing, l1: l1, details: details)
    }

    /// `format-specific` as qemu-img 7.2 lays it out.
    static func formatSpecific(_ h: QCOW2Header, bitmaps: [QCOW2Bitmap]) -> InfoValue {
        var data: [(String, InfoValue)] = [
            ("compat", .string(h.version >= 3 ? "1.1" : "0.10")),
            ("compression-type", .string((QCOW2Compression(rawValue: h.compressionType) ?? .deflate).infoName)),
        ]
        if h.version >= 3 {
            data.append(("lazy-refcounts", .bool(h.lazyRefcounts)))
            if !bitmaps.isEmpty {
                data.append(("bitmaps", .list(bitmaps.map { b in
                    var flags: [InfoValue] = []
                    if b.inUse { flags.append(.string("in-use")) }
                    if b.auto { flags.append(.string("auto")) }
                    return .object([("flags", .list(flags)), ("name", .string(b.name)), ("granularity", .int(b.granularity))])
                })))
            }
        }
        data.append(("refcount-bits", .int(Int64(h.refcountBits))))
        if h.version >= 3 {
            if h.hasDataFile, let d = h.dataFile { data.append(("data-file", .string(d))) }
            if h.hasDataFile { data.append(("data-file-raw", .bool(h.dataFileRaw))) }
            data.append(("corrupt", .bool(h.corrupt)))
            data.append(("extended-l2", .bool(h.extendedL2)))
        }
        return .object([("type", .string("qcow2")), ("data", .object(data))])
    }

    /// The snapshot table, for `info`. Each entry: L1 offset 0-7, L1 size 8-11, id length
    /// 12-13, name length 14-15, date seconds 16-19, nanoseconds 20-23, VM clock 24-31,
    /// VM state size 32-35, extra data size 36-39, extra data, id, name, padding to 8.
    static func readSnapshots(_ file: any BlockDevice, header: QCOW2Header, path: String) async throws -> [QCOW2Snapshot] {
        guard header.nbSnapshots > 0 else { return [] }
        var out: [QCOW2Snapshot] = []
        var pos = header.snapshotsOffset
        let limit = min(file.size, header.snapshotsOffset + QCOW2Header.maxSnapshotTableBytes)
        for i in 0 ..< Int(header.nbSnapshots) {
            guard pos + 40 <= limit else {
                throw FerryError(.corrupt, "qcow2 snapshot table entry \(i) lies past the end of the file", path: path, offset: pos)
            }
            let fixed = BigEndianBytes(bytes: try await readBytes(file, at: pos, count: 40))
            let idLength = Int(fixed.u16(12)), nameLength = Int(fixed.u16(14))
            let extraSize = Int(fixed.u32(36))
            guard extraSize <= 1024 else {
                throw FerryError(.corrupt, "qcow2 snapshot table entry \(i) has \(extraSize) bytes of extra data", path: path, offset: pos)
            }
            let variable = extraSize + idLength + nameLength
            guard pos + 40 + Int64(variable) <= limit else {
                throw FerryError(.corrupt, "qcow2 snapshot table entry \(i) lies past the end of the file", path: path, offset: pos)
            }
            let rest = BigEndianBytes(bytes: try await readBytes(file, at: pos + 40, count: variable))
            var vmState = Int64(fixed.u32(32))
            if extraSize >= 8 { vmState = Int64(bitPattern: rest.u64(0)) }
            var icount: Int64?
            if extraSize >= 24 {
                let v = rest.u64(16)
                if v != UInt64.max { icount = Int64(bitPattern: v) }
            }
            out.append(QCOW2Snapshot(
                id: rest.string(extraSize, idLength), name: rest.string(extraSize + idLength, nameLength),
                vmStateSize: vmState, dateSeconds: Int64(fixed.u32(16)), dateNanoseconds: Int64(fixed.u32(20)),
                vmClockNanoseconds: Int64(bitPattern: fixed.u64(24)), icount: icount,
                l1Offset: Int64(bitPattern: fixed.u64(0)), l1Size: Int(fixed.u32(8)),
                diskSize: extraSize >= 16 ? Int64(bitPattern: rest.u64(8)) : nil))
            pos += Int64((40 + variable + 7) / 8 * 8)
        }
        return out
    }

    /// The bitmap directory, for `info` (only when the autoclear bit says it is consistent).
    /// Each entry: table offset 0-7, table size 8-11, flags 12-15, type 16, granularity bits
    /// 17, name size 18-19, extra data size 20-23, extra data, name, padding to 8.
    static func readBitmaps(_ file: any BlockDevice, header: QCOW2Header, path: String) async throws -> [QCOW2Bitmap] {
        guard header.autoclear & QCOW2Header.bitmapsBit != 0, let ext = header.bitmaps, ext.count > 0 else { return [] }
        guard ext.count <= 65535, ext.directorySize <= 64 << 20,
              ext.directoryOffset % UInt64(header.clusterSize) == 0,
              ext.directoryOffset < UInt64(file.size), ext.directorySize <= UInt64(file.size) - ext.directoryOffset else {
            throw FerryError(.corrupt, "qcow2 bitmap directory at \(ext.directoryOffset) (\(ext.directorySize) bytes) is invalid or lies past the end of the file", path: path, offset: Int64(clamping: ext.directoryOffset))
        }
        let dir = BigEndianBytes(bytes: try await readBytes(file, at: Int64(ext.directoryOffset), count: Int(ext.directorySize)))
        var out: [QCOW2Bitmap] = []
        var pos = 0
        for i in 0 ..< Int(ext.count) {
            guard pos + 24 <= dir.bytes.count else {
                throw FerryError(.corrupt, "qcow2 bitmap directory entry \(i) runs past the directory", path: path, offset: Int64(ext.directoryOffset) + Int64(pos))
            }
            let flags = dir.u32(pos + 12)
            let granularityBits = Int(dir.u8(pos + 17))
            let nameSize = Int(dir.u16(pos + 18))
            let extra = Int(dir.u32(pos + 20))
            let total = 24 + extra + nameSize
            guard granularityBits < 63, extra <= dir.bytes.count, pos + total <= dir.bytes.count else {
                throw FerryError(.corrupt, "qcow2 bitmap directory entry \(i) is invalid", path: path, offset: Int64(ext.directoryOffset) + Int64(pos))
            }
            out.append(QCOW2Bitmap(name: dir.string(pos + 24 + extra, nameSize), granularity: Int64(1) << Int64(granularityBits),
                                   inUse: flags & 1 != 0, auto: flags & 2 != 0,
                                   tableOffset: Int64(bitPattern: dir.u64(pos)), tableSize: Int64(dir.u32(pos + 8))))
            pos += (total + 7) / 8 * 8
        }
        return out
    }
}
