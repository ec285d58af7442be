import FerryCore

/// `check` of a VHDX image, as qemu-img checks one: every block the BAT says is present must
/// lie inside the file (qemu-img's words: the image has probably been truncated). Nothing is
/// repaired.
extension VHDXFormat {
    public static var hasCheck: Bool { true }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        let file = request.file, path = request.location
        let parsed = try await VHDXReader.parse(file, path: path)
        let bat = try await VHDXReader.readBAT(file, parsed, path: path)
        var report = CheckReport()
        for (i, entry) in bat.enumerated() {
            // Fully and partially present payload blocks.
            guard entry & 7 == 6 || entry & 7 == 7 else { continue }
            let offset = Int64(entry >> 20) << 20
            if offset > file.size - parsed.blockSize {
                report.complain("\(path): VHDX BAT entry \(i) start offset \(offset) points after end of file (\(file.size)). Image has probably been truncated.")
                report.corruptions += 1
            }
        }
        return report
    }
}
