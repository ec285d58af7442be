import FerryCore

/// The guest-visible device of a Bochs growing image (read-only). The catalog is read at
/// open; the sector bitmaps of the extents a request touches are read with the request.
/// Sectors written one after another are read with one request; nothing is locked.
final class BochsDevice: HostRunDevice {
    let name: String
    let size: Int64
    let limits = BlockLimits()
    let capabilities: BlockCapabilities = [.extents, .cheapZeroReads]
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
        var out: [HostRun] = []
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        while pos < end && out.count < maxRuns {
            let index = pos / extentSize
            let start = index * extentSize
            let stop = min(start + extentSize, end)
            let host = hosts[Int(index)]
            guard host >= 0 else {
                out.appendJoining(HostRun(offset: pos, length: stop - pos, host: nil))
                pos = stop
                continue
            }
            let first = (pos - start) / Self.sector, last = (stop - 1 - start) / Self.sector
            let bits = try await vhdxReadBytes(file, at: host + first / 8, count: Int(last / 8 - first / 8 + 1))
            var p = pos
            while p < stop {
                let s = (p - start) / Self.sector
                let next = min(stop, start + (s + 1) * Self.sector)
                let written = bits[Int(s / 8 - first / 8)] >> UInt8(s % 8) & 1 != 0
                out.appendJoining(HostRun(offset: p, length: next - p, host: written ? host + bitmapSize + (p - start) : nil))
                p = next
            }
            pos = stop
        }
        return out
    }

    func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try unplacedMapping(in: range)
    }
}
