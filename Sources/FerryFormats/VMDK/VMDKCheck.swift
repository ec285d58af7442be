import FerryCore

/// `check` of a VMDK image, as qemu-img checks one: every allocated grain of every sparse
/// extent must start inside its file. The first that does not ends the check
/// (`ERROR: cluster offset for sector N points after EOF`, then a failed check, as in
/// qemu-img); there are no counts or figures otherwise. Nothing is repaired.
extension VMDKFormat {
    public static var hasCheck: Bool { true }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        var context = FormatContext(location: request.location, readOnly: true, openBacking: { location, _, _ in
            throw FerryError(.notSupported, "a check does not open backing files", path: location)
        }, openFile: request.openFile)
        context.opensBacking = false
        guard let device = try await open(file: request.file, context: context) as? VMDKReadDevice else {
            throw FerryError(.other, "vmdk image did not open as one", path: request.location)
        }
        do {
            let report = try await scan(device)
            try await device.close()
            return report
        } catch {
            try? await device.close()
            throw error
        }
    }

    static func scan(_ device: VMDKReadDevice) async throws -> CheckReport {
        var report = CheckReport()
        for ext in device.extents {
            guard case .sparse(let s) = ext.kind else { continue }
            let span = s.grainBytes * s.tableEntries
            for (gi, at) in s.directory.enumerated() where at != 0 {
                guard let table = try await s.table(for: Int64(gi) * span), !table.empty else { continue }
                for (k, entry) in table.entries.enumerated() where entry > 1 || (entry == 1 && !(s.zeroedGrains || !s.cow)) {
                    guard Int64(entry) * 512 >= s.file.size else { continue }
                    let sector = (ext.start + Int64(gi) * span + Int64(k) * s.grainBytes) / 512
                    report.lines.append("ERROR: cluster offset for sector \(sector) points after EOF")
                    report.failure = "Check failed: Invalid argument"
                    return report
                }
            }
        }
        return report
    }
}
