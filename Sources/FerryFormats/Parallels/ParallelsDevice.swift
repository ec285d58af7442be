import FerryCore

/// The guest-visible device of a Parallels expandable image (read-only).
///
/// The BAT is read whole at open (its size was checked against the file) and every entry the
/// disk uses is checked there: a cluster's place lies in the data area and inside the file.
/// Clusters that follow each other in the file are read with one request; a read across
/// several runs issues them together. Nothing is locked: the device never changes.
public final class ParallelsDevice: HostMappedDevice, DescribedDevice {
    public let name: String
    public let size: Int64
    public let limits = BlockLimits()
    public let capabilities: BlockCapabilities = [.extents, .cheapZeroReads]
    public let backing: (any BlockDevice)? = nil
    public let formatName = ParallelsFormat.name
    public let details: ImageDetails
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
        var d = ImageDetails()
        // qemu-img 7.2 shows neither a cluster size nor a dirty flag for parallels images.
        d.dirtyKnown = false
        self.details = d
    }

    struct Run: MappedRun {
        var offset: Int64
        var length: Int64
        var host: Int64?
        var end: Int64 { offset + length }
        func joins(_ next: Run) -> Bool { (host == nil) == (next.host == nil) }
    }

    /// The runs from `range.lowerBound` (at most about `maxRuns`), joined where they continue
    /// each other in the guest and in the file.
    func runs(in range: Range<Int64>, maxRuns: Int = 4096) -> [Run] {
        var out: [Run] = []
        let end = min(range.upperBound, size)
        var pos = range.lowerBound
        while pos < end && out.count < maxRuns {
            let cluster = pos / clusterSize
            let stop = min((cluster + 1) * clusterSize, end)
            let h = hosts[Int(cluster)]
            out.appendJoining(Run(offset: pos, length: stop - pos, host: h == 0 ? nil : h + pos - cluster * clusterSize))
            pos = stop
        }
        return out
    }

    // MARK: - BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        let end = offset + Int64(buffer.count)
        var pos = offset
        while pos < end {
            var reads: [HostRead] = []
            for r in runs(in: pos ..< end) {
                let start = Int(r.offset - offset)
                let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[start ..< start + Int(r.length)])
                if let host = r.host {
                    reads.append(HostRead(device: file, host: host, buffer: dst))
                } else {
                    dst.initializeMemory(as: UInt8.self, repeating: 0)
                }
                pos = r.end
            }
            try await readTogether(reads)
        }
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw readOnlyFormatError(formatName, name, offset)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw readOnlyFormatError(formatName, name, offset)
    }

    public func discard(at offset: Int64, length: Int64) async throws {}

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try await layerExtents(in: range)
    }

    public func layerExtents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        guard range.lowerBound < size else { return [Extent(offset: range.lowerBound, length: 0, kind: .unallocated)] }
        return runs(in: range, maxRuns: 1024).map {
            Extent(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : .data)
        }.coalesced()
    }

    /// As qemu-img 7.2 maps a parallels image: written clusters as data at their place in
    /// the file, the others absent (and so zero).
    public func layerMapping(in range: Range<Int64>) async throws -> [LayerMapping] {
        try checkRange(range.lowerBound, range.upperBound - range.lowerBound)
        return runs(in: range, maxRuns: 1024).map {
            LayerMapping(offset: $0.offset, length: $0.length, kind: $0.host == nil ? .unallocated : .data, hostOffset: $0.host)
        }
    }

    public var hostFileName: String { file.name }

    public func flush() async throws {}

    public func close() async throws {
        try await file.close()
    }
}
