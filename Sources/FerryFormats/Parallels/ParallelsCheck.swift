import FerryCore

/// `check` of a Parallels image, as qemu-img checks one: an image left open for writing is
/// an error, so is a BAT entry whose cluster lies outside the file, and space after the last
/// cluster is leaked. Allocation and fragmentation as qemu-img counts them (a cluster not
/// right after the one the BAT entry before it names). `-r all` marks the image closed and
/// drops BAT entries outside the file; either `-r` cuts leaked space off the end.
extension ParallelsFormat {
    public static var hasCheck: Bool { true }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        let file = request.file, path = request.location
        let context = FormatContext(location: path, readOnly: true) { location, _, _ in
            throw FerryError(.notSupported, "parallels images have no backing files", path: location)
        }
        let h = try ParallelsHeader(try await readHeader(file, count: ParallelsHeader.size, context: context), fileSize: file.size, path: path)
        var report = CheckReport()
        let cs = h.clusterSize
        report.totalClusters = (h.virtualSize + cs - 1) / cs
        if h.dirty {
            if request.repair == .all {
                report.lines.append("Repairing image was not closed correctly")
                try await writeLE32(ParallelsHeader.inUseClosed, at: 44, in: file)
                report.corruptionsFixed += 1
            } else {
                report.lines.append("ERROR image was not closed correctly")
                report.corruptions += 1
            }
        }
        var end = h.dataOffset
        if h.batEntries > 0 {
            let b = VHDXBytes(try await vhdxReadBytes(file, at: Int64(ParallelsHeader.size), count: h.batEntries * 4))
            var previous: Int64 = 0
            for i in 0 ..< h.batEntries {
                let host = Int64(b.u32(i * 4)) * h.entryUnit * ParallelsHeader.sector
                defer { previous = host }
                guard host != 0 else { continue }
                if host > file.size - cs {
                    if request.repair == .all {
                        report.lines.append("Repairing cluster \(i) is outside image")
                        try await writeLE32(0, at: Int64(ParallelsHeader.size + i * 4), in: file)
                        report.corruptionsFixed += 1
                        continue
                    }
                    report.lines.append("ERROR cluster \(i) is outside image")
                    report.corruptions += 1
                }
                report.allocatedClusters += 1
                if previous != 0 && previous + cs != host { report.fragmentedClusters += 1 }
                end = max(end, host + cs)
            }
        }
        if file.size > end {
            let clusters = Int((file.size - end + cs - 1) / cs)
            if request.repair != nil, let setFileLength = request.setFileLength {
                report.lines.append("Repairing space leaked at the end of the image \(file.size - end)")
                // The file is opened again at its new length; the cut is its last change.
                try await setFileLength(end).flush()
                report.leaksFixed += clusters
                report.imageEndOffset = end
                return report
            } else {
                report.lines.append("ERROR space leaked at the end of the image \(file.size - end)")
                report.leaks += clusters
            }
        }
        report.imageEndOffset = end
        if report.leaksFixed + report.corruptionsFixed > 0 { try await file.flush() }
        return report
    }

    private static func writeLE32(_ value: UInt32, at offset: Int64, in file: any BlockDevice) async throws {
        // One sector, read and written whole, for files opened with O_DIRECT.
        let start = offset / 512 * 512
        let buffer = AlignedBuffer(count: 512)
        try await readHost(file, at: start, into: buffer.mutableBytes)
        buffer.mutableBytes.storeBytes(of: value.littleEndian, toByteOffset: Int(offset - start), as: UInt32.self)
        try await file.write(at: start, from: buffer.bytes, flags: [])
    }
}
