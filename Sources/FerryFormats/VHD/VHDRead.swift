import FerryCore

/// Opens VHD images: fixed (the guest bytes, then the footer), dynamic (footer copy, header,
/// BAT, blocks each behind its sector bitmap, footer) and differencing (a dynamic disk whose
/// sector bitmaps say which sectors it holds; the others come from its parent).
enum VHDReader {
    /// Most bytes of parent locator data read (a path; the specification's are a few hundred).
    static let maxLocatorBytes: Int64 = 32 << 10

    static func readBytes(_ file: any BlockDevice, at offset: Int64, count: Int) async throws -> [UInt8] {
        let buffer = AlignedBuffer(count: max(count, 1))
        try await readHost(file, at: offset, into: buffer.slice(0 ..< count))
        return Array(buffer.bytes[0 ..< count])
    }

    static func open(file: any BlockDevice, context: FormatContext) async throws -> VHDReadDevice {
        let name = context.location
        guard file.size >= Int64(VHDLayout.footerSize) else {
            throw FerryError(.corrupt, "vhd image is truncated: \(file.size) bytes cannot hold its 512-byte footer", path: name, offset: 0)
        }
        let endAt = file.size - Int64(VHDLayout.footerSize)
        var footerAt = endAt
        var found = try VHDLayout.Footer.parse(try await readBytes(file, at: endAt, count: VHDLayout.footerSize), file: name, at: endAt)
        if found == nil && endAt > 0 {
            // A dynamic disk keeps a copy at offset 0 (the one at the end may be cut off).
            footerAt = 0
            found = try VHDLayout.Footer.parse(try await readBytes(file, at: 0, count: VHDLayout.footerSize), file: name, at: 0)
        }
        guard let footer = found else {
            throw FerryError(.corrupt, "no vhd footer (cookie 'conectix') at offset \(endAt) or 0", path: name, offset: endAt)
        }
        guard let type = VHDLayout.DiskType(rawValue: footer.diskType) else {
            throw FerryError(.corrupt, "unknown vhd disk type \(footer.diskType) in the footer at offset \(footerAt)", path: name, offset: footerAt)
        }
        let size = footer.virtualSize
        guard size >= 0 else {
            throw FerryError(.corrupt, "vhd current size \(footer.currentSize) in the footer at offset \(footerAt) is too large", path: name, offset: footerAt)
        }
        var details = ImageDetails()
        if type == .fixed {
            // A size from the geometry may run past the footer (qemu-img reads on: the
            // footer's bytes, then zeros past the end of the file).
            guard footerAt == endAt else {
                throw FerryError(.corrupt, "fixed vhd image has no footer at its end (offset \(endAt))", path: name, offset: endAt)
            }
            return VHDReadDevice(name: name, file: file, type: type, size: size, blockSize: 0, bat: [], backing: nil, details: details)
        }
        // The dynamic disk header.
        let hAt = Int64(bitPattern: footer.dataOffset)
        guard hAt >= 0, hAt <= file.size - Int64(VHDLayout.headerSize) else {
            throw FerryError(.corrupt, "vhd dynamic disk header offset \(footer.dataOffset) (footer at offset \(footerAt)) is past the end of the file (\(file.size) bytes)",
                             path: name, offset: footerAt)
        }
        let header = try VHDLayout.Header.parse(try await readBytes(file, at: hAt, count: VHDLayout.headerSize), file: name, at: hAt)
        let bs = Int64(header.blockSize)
        guard bs >= VHDLayout.sector, bs <= VHDLayout.maxBlockSize, bs & (bs - 1) == 0 else {
            throw FerryError(.corrupt, "vhd block size \(bs) in the dynamic disk header at offset \(hAt) is not a power of two from 512 to 256 MiB",
                             path: name, offset: hAt)
        }
        let blocks = (size + bs - 1) / bs
        guard Int64(header.maxTableEntries) >= blocks else {
            throw FerryError(.corrupt, "vhd block allocation table (\(header.maxTableEntries) entries, dynamic disk header at offset \(hAt)) is too small for the virtual size \(size)",
                             path: name, offset: hAt)
        }
        let tAt = Int64(bitPattern: header.tableOffset)
        // The table is read whole: never more than the file holds.
        guard tAt >= 0, tAt <= file.size, blocks * 4 <= file.size - tAt else {
            throw FerryError(.corrupt, "vhd block allocation table at offset \(header.tableOffset) (\(blocks * 4) bytes) is past the end of the file (\(file.size) bytes)",
                             path: name, offset: hAt)
        }
        let raw = try await readBytes(file, at: tAt, count: Int(blocks * 4))
        let bitmap = VHDLayout.bitmapBytes(blockSize: bs)
        var bat = [UInt32](repeating: VHDLayout.unallocated, count: Int(blocks))
        for i in 0 ..< Int(blocks) {
            let e = VHDLayout.be32(raw, i * 4)
            bat[i] = e
            guard e != VHDLayout.unallocated else { continue }
            let inImage = min(bs, size - Int64(i) * bs)
            guard Int64(e) * VHDLayout.sector + bitmap + inImage <= file.size else {
                throw FerryError(.corrupt, "vhd BAT entry \(i) (block at offset \(Int64(e) * VHDLayout.sector)) lies past the end of the file (\(file.size) bytes) at offset \(tAt + Int64(i) * 4)",
                                 path: name, offset: tAt + Int64(i) * 4)
            }
        }
        details.clusterSize = Int(bs)
        var backing: (any BlockDevice)?
        if type == .differencing {
            let (stored, relative) = try await parentPath(file: file, header: header, headerAt: hAt, name: name)
            let full = resolveRelative(relative, to: name)
            details.backingFilename = stored
            details.fullBackingFilename = full
            if context.opensBacking {
                backing = try await context.openBacking(full, VHDFormat.name, context.depth + 1)
            }
        }
        return VHDReadDevice(name: name, file: file, type: type, size: size, blockSize: bs, bat: bat, backing: backing, details: details)
    }

    /// The parent's path from a differencing disk's header: a relative Windows locator
    /// (`W2ru`, UTF-16LE, `.\parent.vhd`), else the parent's bare file name in the header.
    /// Absolute locators (`W2ku`, `MacX`) name places on another machine and are not followed;
    /// a path with `..` components, or one that is absolute, is refused.
    static func parentPath(file: any BlockDevice, header: VHDLayout.Header, headerAt: Int64, name: String) async throws -> (String, String) {
        var candidates: [(String, Int64)] = []
        for (i, loc) in header.locators.enumerated() where loc.code == Array("W2ru".utf8) {
            let at = Int64(bitPattern: loc.dataOffset)
            let len = Int64(loc.dataLength)
            let where_ = headerAt + 576 + Int64(i) * 24
            guard len > 0, len <= maxLocatorBytes, at >= 0, at <= file.size - len else {
                throw FerryError(.corrupt, "vhd parent locator \(i) (\(len) bytes at offset \(loc.dataOffset)) is outside the file or too long, in the dynamic disk header at offset \(where_)",
                                 path: name, offset: where_)
            }
            let bytes = try await readBytes(file, at: at, count: Int(len))
            var units: [UInt16] = []
            var k = 0
            while k + 1 < bytes.count { units.append(UInt16(bytes[k]) | (UInt16(bytes[k + 1]) << 8)); k += 2 }
            candidates.append((decodeUTF16(units), at))
        }
        if candidates.isEmpty {
            var units: [UInt16] = []
            var k = 0
            while k + 1 < header.parentName.count {
                units.append((UInt16(header.parentName[k]) << 8) | UInt16(header.parentName[k + 1]))
                k += 2
            }
            let n = decodeUTF16(units)
            if !n.isEmpty && !n.contains("\\") && !n.contains("/") { candidates.append((n, headerAt + 64)) }
        }
        guard let (stored, at) = candidates.first else {
            throw FerryError(.corrupt, "differencing vhd names no relative parent (no W2ru parent locator or parent name) in the dynamic disk header at offset \(headerAt)",
                             path: name, offset: headerAt)
        }
        let path = stored.replacingBackslashes()
        var parts = path.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        let absolute = path.hasPrefix("/") || (parts.first.map { $0.count == 2 && $0.hasSuffix(":") } ?? false)
        guard !absolute else {
            throw FerryError(.corrupt, "vhd parent path '\(stored)' is absolute; only paths relative to the image are followed (parent locator at offset \(at))",
                             path: name, offset: at)
        }
        guard !parts.contains("..") else {
            throw FerryError(.corrupt, "vhd parent path '\(stored)' escapes the image's directory with '..' (parent locator at offset \(at))",
                             path: name, offset: at)
        }
        parts.removeAll { $0 == "." || $0.isEmpty }
        guard !parts.isEmpty else {
            throw FerryError(.corrupt, "vhd parent path '\(stored)' is empty (parent locator at offset \(at))", path: name, offset: at)
        }
        return (stored, parts.joined(separator: "/"))
    }

    static func decodeUTF16(_ units: [UInt16]) -> String {
        let upTo = units.firstIndex(of: 0).map { Array(units[..<$0]) } ?? units
        return String(decoding: upTo, as: UTF16.self)
    }
}

extension String {
    func replacingBackslashes() -> String {
        String(self.map { $0 == "\\" ? "/" : $0 })
    }
}
