import FerryCore

/// `check` of a QED image, as qemu-img checks one: QED keeps no refcounts, so every cluster
/// of the file that no structure uses (header, L1 table, L2 tables, data clusters) is a
/// leak, and a table entry pointing outside the file or off a cluster boundary is a
/// corruption. Nothing is repaired (qemu-img's `-r` only clears the need-check flag).
extension QEDFormat {
    public static var hasCheck: Bool { true }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        let file = request.file, path = request.location
        let head = try await bytes(file, at: 0, count: Int(min(file.size, Int64(QEDHeader.size))))
        let h = try await QEDHeader.parse(head, fileSize: file.size, path: path) { try await bytes(file, at: $0, count: $1) }
        let cs = h.clusterSize
        let fileClusters = (file.size + cs - 1) / cs
        var used = [Bool](repeating: false, count: Int(fileClusters))
        func use(_ offset: Int64, _ count: Int64) {
            for c in offset / cs ..< min(fileClusters, (offset + count + cs - 1) / cs) { used[Int(c)] = true }
        }
        func valid(_ offset: UInt64, _ length: Int64) -> Bool {
            offset % UInt64(cs) == 0 && offset < UInt64(file.size) && UInt64(file.size) - offset >= UInt64(length)
        }
        var report = CheckReport()
        report.totalClusters = (h.imageSize + cs - 1) / cs
        use(0, h.headerSize * cs)
        use(h.l1TableOffset, h.tableBytes)
        let l1 = QEDDevice.entries(try await bytes(file, at: h.l1TableOffset, count: Int(h.tableBytes)))
        for e in l1 where e != 0 {
            guard valid(e, h.tableBytes) else {
                report.corruptions += 1
                continue
            }
            use(Int64(e), h.tableBytes)
            // Contiguity is counted within each L2 table, as qemu-img counts it.
            var next: UInt64 = 0
            for d in QEDDevice.entries(try await bytes(file, at: Int64(e), count: Int(h.tableBytes))) where d > QEDDevice.zeroCluster {
                guard valid(d, 1) else {
                    report.corruptions += 1
                    continue
                }
                use(Int64(d), cs)
                report.allocatedClusters += 1
                if next != 0 && d != next { report.fragmentedClusters += 1 }
                next = d + UInt64(cs)
            }
        }
        report.leaks = used.lazy.filter { !$0 }.count
        return report
    }
}
