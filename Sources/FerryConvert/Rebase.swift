import FerryCore
import FerryFormats
#if canImport(Glibc)
import Glibc
#endif

extension Images {
    /// `ferry rebase` (safe mode): makes the image at `spec` read the same over
    /// `backingFile` (resolved against its directory; "" for none) as it reads now over its
    /// present backing file. Every cluster its own layer leaves to the backing file is read
    /// from both backing files, many clusters in flight; where they differ, what the old one
    /// holds is written into the image (`ImageFormat.fillLayer`). Then the header names the
    /// new backing file. Returns the number of clusters copied.
    @discardableResult
    public static func rebase(_ spec: ImageSpec, backingFile: String, backingFormat: String?, inFlight: Int = 16) async throws -> Int {
        if !backingFile.isEmpty, backingFormat == nil {
            throw FerryError(.invalidArgument, "Could not change the backing file to '\(backingFile)': backing format must be specified")
        }
        let image = try await open(spec, readOnly: true)
        var newBacking: OpenedImage?
        do {
            let top = image.device
            guard let layered = top as? LayeredDevice, let cs = (top as? DescribedDevice)?.details.clusterSize.map(Int64.init), cs > 0 else {
                throw FerryError(.notSupported, "format '\(image.format)' has no backing file to change", path: spec.location)
            }
            let old = layered.backing
            if !backingFile.isEmpty {
                newBacking = try await open(ImageSpec(resolveRelative(backingFile, to: spec.location), format: backingFormat), readOnly: true)
            }
            let new = newBacking?.device
            // The clusters the image's own layer leaves to the backing file.
            var candidates: [Int64] = []
            var pos: Int64 = 0
            while pos < top.size {
                let batch = try await layered.layerExtents(in: pos ..< top.size)
                guard let first = batch.first, first.offset == pos, first.length > 0 else {
                    throw FerryError(.corrupt, "extents at offset \(pos) do not start where asked", path: spec.location, offset: pos)
                }
                for e in batch where e.offset == pos && e.length > 0 {
                    if e.kind == .unallocated {
                        // Only where either backing file has data can they differ.
                        let start = e.offset / cs * cs
                        let old = try await dataClusters(old, in: start ..< e.end, clusterSize: cs)
                        let new = try await dataClusters(new, in: start ..< e.end, clusterSize: cs)
                        candidates += Set(old).union(new).sorted()
                    }
                    pos = e.end
                }
            }
            // Those whose contents differ between the old and the new backing file.
            let size = top.size
            let differing = try await withThrowingTaskGroup(of: Int64?.self) { group -> [Int64] in
                var next = 0, found: [Int64] = []
                func add() {
                    let c = candidates[next]
                    next += 1
                    group.addTask {
                        let n = Int(min(cs, size - c))
                        let a = AlignedBuffer(count: Int(cs)), b = AlignedBuffer(count: Int(cs))
                        try await readClipped(old, at: c, into: a.slice(0 ..< n))
                        try await readClipped(new, at: c, into: b.slice(0 ..< n))
                        return memcmp(a.bytes.baseAddress!, b.bytes.baseAddress!, n) == 0 ? nil : c
                    }
                }
                while next < min(inFlight, candidates.count) { add() }
                while let r = try await group.next() {
                    if let c = r { found.append(c) }
                    if next < candidates.count { add() }
                }
                return found.sorted()
            }
            // Written into the image, then the header changed.
            try await changeInPlace(ImageSpec(spec.location, format: image.format)) { file, format in
                try await format.fillLayer(LayerFill(location: spec.location, file: file.current, clusters: differing, read: { c, buffer in
                    buffer.initializeMemory(as: UInt8.self, repeating: 0)
                    let n = Int(min(cs, size - c))
                    try await readClipped(old, at: c, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0 ..< n]))
                }, setFileLength: file.setLength))
                try await format.amend(ImageAmendment(location: spec.location, file: file.current, backingFile: backingFile,
                                                      backingFormat: backingFile.isEmpty ? nil : backingFormat, setFileLength: file.setLength))
            }
            if let newBacking { try await newBacking.device.close() }
            try await image.device.close()
            return differing.count
        } catch {
            if let newBacking { try? await newBacking.device.close() }
            try? await image.device.close()
            throw error
        }
    }

    /// The offsets of the clusters of `range` in which `device` has data (none past its end).
    static func dataClusters(_ device: (any BlockDevice)?, in range: Range<Int64>, clusterSize cs: Int64) async throws -> [Int64] {
        guard let device, range.lowerBound < device.size else { return [] }
        var out: [Int64] = []
        try await device.forEachExtent(in: range.lowerBound ..< min(range.upperBound, device.size)) { e in
            guard e.kind == .data else { return }
            var c = max(e.offset / cs * cs, (out.last ?? -cs) + cs)
            while c < e.end { out.append(c); c += cs }
        }
        return out
    }

    /// Reads `buffer.count` bytes of `device` at `offset`, zeros past its end (or with none).
    static func readClipped(_ device: (any BlockDevice)?, at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        guard let device, offset < device.size else { return }
        let n = Int(min(Int64(buffer.count), device.size - offset))
        try await device.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0 ..< n]))
    }
}
