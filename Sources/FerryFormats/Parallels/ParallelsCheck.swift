import FerryCore

/// `check` of a Parallels image, as qemu-img checks one: an image left open for writing is
/// an error, so is a BAT entry whose cluster lies outside the file, and space after the last
/// cluster is leaked. Allocation and fragmentation as qemu-img counts them (a cluster not
/// right after the one the BAT entry before it names). Repairs are not made by Ferry.
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
            report.lines.append("ERROR image was not closed correctly")
            report.corruptions += 1
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
                    report.lines.append("ERROR cluster \(i) is outside image")
                    report.corruptions += 1
                }
                report.allocatedClusters += 1
                if previous != 0 && previous + cs != host { report.fragmentedClusters += 1 }
                end = max(end, host + cs)
            }
        }
        if file.size > end {
            report.lines.append("ERROR space leaked at the end of the image \(file.size - end)")
            report.leaks += Int((file.size - end + cs - 1) / cs)
        }
        report.imageEndOffset = end
        if request.repair != nil, report.corruptions + report.leaks > 0 {
            report.failure = "ferry cannot repair parallels images yet (qemu-img check -r can)"
        }
        return report
    }
}
