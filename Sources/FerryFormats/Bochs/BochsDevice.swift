import FerryCore

/// The guest-visible device of a Bochs growing image (read-only). The catalog is read at
/// open; the sector bitmaps of the extents a request touches are read with the request.
/// Sectors written one after another are read with one request; nothing is locked.
final class BochsDevice: HostRunDevice {
    let name: String
    let size: Int64
    let formatName = BochsFormat.name
    let details = BochsDevice.undescribed
    let file: any BlockDevice
    let extentSize: Int64
    let bitmapSize: Int64
    /// Where each extent (its bitmap, then its sectors) is in the file, -1 for none.
    let hosts: [Int64]
    static let sector: Int64 = 512

    init(name: String, file: any BlockDevice, size: Int64, extentSize: Int64, bitmapSize: Int64, hosts: [Int64]) {
        self.name = name
        self.file = file
        self.size = size
        self.extentSize = extentSize
        self.bitmapSize = bitmapSize
        self.hosts = hosts
    }

    /// Written sectors at their place in the file, the others holes.
    func runs(in range: Range<Int64>, maxRuns: Int = 4096) async throws -> [HostRun] {
        try await walk(range, unit: extentSize, maxRuns: maxRuns) { index, part, start, out in
            let host = hosts[index]
            guard host >= 0 else {
                out.appendJoining(HostRun(offset: part.lowerBound, length: part.upperBound - part.lowerBound, host: nil))
                return
            }
            // The bitmap bytes of the sectors asked for, then a run per sector.
            let first = (part.lowerBound - start) / Self.sector, last = (part.upperBound - 1 - start) / Self.sector
            let bits = try await vhdxReadBytes(file, at: host + first / 8, count: Int(last / 8 - first / 8 + 1))
            for s in first ... last {
                let from = max(part.lowerBound, start + s * Self.sector), to = min(part.upperBound, start + (s + 1) * Self.sector)
                let written = bits[Int(s / 8 - first / 8)] >> UInt8(s % 8) & 1 != 0
                out.appendJoining(HostRun(offset: from, length: to - from, host: written ? host + bitmapSize + (from - start) : nil))
            }
        }
    }

    func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try unplacedMapping(in: range)
    }
}
