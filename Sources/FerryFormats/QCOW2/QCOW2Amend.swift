import FerryCore

extension QCOW2Format {
    /// Rewrites the header cluster: a new backing file name and format (the backing-format
    /// extension replaced, every other extension kept), or lazy_refcounts switched. Options
    /// that would need the image rewritten (compat, refcount_bits, data_file changes) are
    /// refused unless they leave the image as it is.
    public static func amend(_ change: ImageAmendment) async throws {
        let path = change.location
        var m = try await QCOW2InPlace(file: change.file, path: path, setFileLength: change.setFileLength ?? { _ in
            throw FerryError(.notSupported, "the image file cannot grow here, as this change needs", path: path)
        })
        let h = m.header
        var compatible = h.compatible
        var version = h.version
        var dataFile = h.dataFile
        var refcountBits = h.refcountBits
        for (key, value) in change.options.sorted(by: { $0.key < $1.key }) {
            switch key {
            case "lazy_refcounts":
                guard ["on", "off"].contains(value) else {
                    throw FerryError(.invalidArgument, "Parameter 'lazy_refcounts' expects 'on' or 'off'")
                }
                let on = value == "on"
                compatible = on ? compatible | QCOW2Header.lazyRefcountsBit : compatible & ~QCOW2Header.lazyRefcountsBit
            case "compat":
                let want: UInt32? = ["1.1": 3, "v3": 3, "0.10": 2, "v2": 2][value]
                guard let want else { throw FerryError(.invalidArgument, "Invalid compatibility level: '\(value)'") }
                version = want
            case "refcount_bits":
                guard let bits = Int(value), (1 ... 64).contains(bits), bits.nonzeroBitCount == 1 else {
                    throw FerryError(.invalidArgument, "Refcount width must be a power of two and may not exceed 64 bits")
                }
                refcountBits = bits
            case "backing_file", "backing_fmt":
                // Both as they are, or it is a change (as qemu-img 7.2 judges it).
                guard change.options["backing_file"] == h.backingFile, change.options["backing_fmt"] == h.backingFormat else {
                    throw FerryError(.notSupported, "Cannot amend the backing file. You can use 'ferry rebase -u' instead.")
                }
            case "data_file":
                guard h.hasDataFile else {
                    throw FerryError(.invalidArgument, "data-file can only be set for images that use an external data file")
                }
                dataFile = value.isEmpty ? nil : value
            case "size":
                throw FerryError(.notSupported, "ferry amend does not change sizes; use 'ferry resize'", path: path)
            case _ where createOptions.contains(where: { $0.name == key }):
                throw FerryError(.invalidArgument, "Invalid parameter '\(key)'. This option is only supported for image creation")
            default:
                throw FerryError(.invalidArgument, "Invalid parameter '\(key)'")
            }
        }
        var backing = h.backingFile
        var backingFormat = h.backingFormat
        if let b = change.backingFile {
            backing = b.isEmpty ? nil : b
            backingFormat = b.isEmpty ? nil : change.backingFormat
        }
        if compatible & QCOW2Header.lazyRefcountsBit != 0 && version < 3 {
            throw FerryError(.invalidArgument, "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
        }
        if refcountBits != 16 && version < 3 {
            throw FerryError(.invalidArgument, "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
        }
        if version < h.version { try await checkDowngrade(m, refcountBits: refcountBits) }
        if version > h.version {
            for sn in try await readSnapshots(m.file, header: h, path: path) where sn.diskSize == nil {
                throw FerryError(.notSupported, "ferry cannot upgrade this image yet: snapshot '\(sn.name)' lacks the extra data compat 1.1 needs", path: path)
            }
        }
        // New refcount structures are written first; the header below switches to them.
        let refcounts = refcountBits == h.refcountBits ? nil : try await rebuildRefcounts(&m, bits: refcountBits)
        let cluster = try await m.read(at: 0, count: Int(m.cs))
        var bytes = try rewriteHeader(cluster, header: h, version: version, compatible: compatible, backing: backing,
                                      backingFormat: backingFormat, dataFile: dataFile, path: path)
        if let refcounts {
            QCOW2HeaderWriter.put64(&bytes, 48, UInt64(refcounts.tableOffset))
            QCOW2HeaderWriter.put32(&bytes, 56, UInt32(refcounts.tableClusters))
            if version >= 3 { QCOW2HeaderWriter.put32(&bytes, 96, UInt32(refcountBits.trailingZeroBitCount)) }
        }
        try await m.write(bytes, at: 0)
        try await m.flush()
    }

    /// The first cluster with the backing file and its format replaced and the compatible
    /// features set: the fixed header as it is, the extensions but the backing format one,
    /// a new backing format extension, the end marker, the backing file name, zeros.
    /// What compat=0.10 cannot hold: incompatible features, bitmaps, refcount widths but
    /// 16, zero clusters (qemu-img writes them out as data; ferry refuses).
    static func checkDowngrade(_ m: QCOW2InPlace, refcountBits: Int) async throws {
        let h = m.header, path = m.path
        func refuse(_ why: String) -> FerryError {
            FerryError(.notSupported, "ferry cannot downgrade this image to compat=0.10 yet: \(why)", path: path)
        }
        if h.incompatible != 0 { throw refuse("it uses incompatible features (0x\(String(h.incompatible, radix: 16)))") }
        if refcountBits != 16 { throw refuse("its refcount_bits is \(refcountBits), not 16") }
        if h.autoclear & QCOW2Header.bitmapsBit != 0, let b = h.bitmaps, b.count > 0 { throw refuse("it has persistent bitmaps") }
        var l1Tables = [(h.l1TableOffset, h.l1Size)]
        for sn in try await readSnapshots(m.file, header: h, path: path) { l1Tables.append((sn.l1Offset, sn.l1Size)) }
        for (offset, size) in l1Tables where size > 0 {
            let raw = try await m.read(at: offset, count: size * 8)
            for i in 0 ..< size {
                let l2 = Int64(QCOW2InPlace.entry(raw, i, bits: 64) & QCOW2InPlace.offsetMask)
                guard l2 != 0 else { continue }
                let table = try await m.read(at: l2, count: Int(m.cs))
                for k in 0 ..< Int(m.cs) / 8 where QCOW2InPlace.entry(table, k, bits: 64) & (QCOW2InPlace.compressedBit | 1) == 1 {
                    throw refuse("it has zero clusters")
                }
            }
        }
    }

    static func rewriteHeader(_ cluster: [UInt8], header h: QCOW2Header, version: UInt32, compatible: UInt64, backing: String?,
                              backingFormat: String?, dataFile: String?, path: String) throws -> [UInt8] {
        let cs = cluster.count
        let fixed = h.version >= 3 ? h.headerLength : 72
        let b = BigEndianBytes(bytes: cluster)
        var extensions: [(type: UInt32, data: ArraySlice<UInt8>)] = []
        var pos = fixed
        while pos + 8 <= cs {
            let type = b.u32(pos), length = Int(b.u32(pos + 4))
            if type == QCOW2Header.extEnd { break }
            guard length <= cs - pos - 8 else {
                throw FerryError(.corrupt, "qcow2 header extension \(String(type, radix: 16)) runs past the first cluster", path: path, offset: Int64(pos))
            }
            if type == QCOW2Header.extDataFile {
                // Replaced where it was (or dropped: the incompatible bit stays, as qemu-img leaves it).
                if let dataFile { extensions.append((type, ArraySlice(Array(dataFile.utf8)))) }
            } else if type != QCOW2Header.extBackingFormat {
                extensions.append((type, cluster[pos + 8 ..< pos + 8 + length]))
            }
            pos += 8 + (length + 7) / 8 * 8
        }
        if let dataFile, !extensions.contains(where: { $0.type == QCOW2Header.extDataFile }) {
            extensions.insert((QCOW2Header.extDataFile, ArraySlice(Array(dataFile.utf8))), at: 0)
        }
        if let f = backingFormat { extensions.insert((QCOW2Header.extBackingFormat, ArraySlice(Array(f.utf8))), at: 0) }
        var out = Array(cluster[0 ..< fixed])
        if version != h.version {
            // 72 bytes for compat 0.10; 112 for 1.1 (no features, refcount order 4, zlib).
            out = Array(cluster[0 ..< 72])
            QCOW2InPlace.setEntry(&out, 1, bits: 32, UInt64(version))
            if version >= 3 {
                var more = [UInt8](repeating: 0, count: 40)
                QCOW2InPlace.setEntry(&more, 6, bits: 32, 4)
                QCOW2InPlace.setEntry(&more, 7, bits: 32, 112)
                out += more
            } else {
                extensions.removeAll { $0.type == QCOW2Header.extFeatureNames }
            }
        }
        for e in extensions {
            var head = [UInt8](repeating: 0, count: 8)
            QCOW2InPlace.setEntry(&head, 0, bits: 32, UInt64(e.type))
            QCOW2InPlace.setEntry(&head, 1, bits: 32, UInt64(e.data.count))
            out += head + e.data + [UInt8](repeating: 0, count: (8 - e.data.count % 8) % 8)
        }
        out += [UInt8](repeating: 0, count: 8)
        var fields = [UInt8](repeating: 0, count: 12)
        if let backing {
            let name = Array(backing.utf8)
            guard name.count <= 1023 else {
                throw FerryError(.invalidArgument, "backing file name is too long (\(name.count) bytes; at most 1023)", path: path)
            }
            QCOW2InPlace.setEntry(&fields, 0, bits: 64, UInt64(out.count))
            QCOW2InPlace.setEntry(&fields, 2, bits: 32, UInt64(name.count))
            out += name
        }
        guard out.count <= cs else {
            throw FerryError(.notSupported, "the new qcow2 header does not fit in the first cluster (\(out.count) of \(cs) bytes)", path: path)
        }
        out[8 ..< 20] = fields[...]
        if version >= 3 {
            var c = [UInt8](repeating: 0, count: 8)
            QCOW2InPlace.setEntry(&c, 0, bits: 64, compatible)
            out[80 ..< 88] = c[...]
        }
        return out + [UInt8](repeating: 0, count: cs - out.count)
    }
}
