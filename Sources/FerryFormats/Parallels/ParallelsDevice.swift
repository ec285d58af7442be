import FerryCore

/// The guest-visible device of a Parallels expandable image (read-only).
///
/// The BAT is read whole at open (its size was checked against the file) and every entry the
/// disk uses is checked there: a cluster's place lies in the data area and inside the file.
/// Clusters that follow each other in the file are read with one request; a read across
/// several runs issues them together. Nothing is locked: the device never changes.
final class ParallelsDevice: HostRunDevice {
    let name: String
    let size: Int64
    let formatName = ParallelsFormat.name
    let details = ParallelsDevice.undescribed
    let file: any BlockDevice
    let clusterSize: Int64
    /// Each cluster's place in the file in bytes, 0 for none.
    let hosts: [Int64]

    init(name: String, file: any BlockDevice, size: Int64, clusterSize: Int64, hosts: [Int64]) {
        self.name = name
        self.file = file
        self.size = size
        self.clusterSize = clusterSize
        self.hosts = hosts
    }

    func runs(in range: Range<Int64>, maxRuns: Int = 4096) async -> [HostRun] {
        await walk(range, unit: clusterSize, maxRuns: maxRuns) { index, part, start, out in
            let h = hosts[index]
            out.appendJoining(HostRun(offset: part.lowerBound, length: part.upperBound - part.lowerBound, host: h == 0 ? nil : h + part.lowerBound - start))
        }
    }

    /// As qemu-img 7.2 maps a parallels image: written clusters as data at their place in
    /// the file, the others absent (and so zero).
    func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return await runs(in: range, maxRuns: 1024).map {
            LayerMapping(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : .data, hostOffset: $0.host)
        }
    }
}
