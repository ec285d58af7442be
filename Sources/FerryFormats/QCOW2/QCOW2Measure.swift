import FerryCore

extension QCOW2Format {
    /// The file a new image would take, laid out as a fully allocated image is: the header
    /// cluster, the L1 table, every L2 table, the refcount blocks and table covering all of
    /// them and the data, and the data clusters. Without preallocation only the data clusters
    /// the source fills are counted. Bitmaps: each one's bits in whole clusters, its bitmap
    /// table, and the bitmap directory, for images of compat 1.1 made from a source that can
    /// hold bitmaps.
    public static func measure(_ source: MeasureSource, options: [String: String]) async throws -> SizeMeasurement? {
        let opts = try QCOW2CreateOptions(options)
        let cs = Int64(opts.clusterSize)
        guard source.size >= 0, source.size <= Int64.max - cs else {
            throw FerryError(.invalidArgument, "invalid size \(source.size)")
        }
        let aligned = roundUp(source.size, cs)
        let dataClusters = aligned / cs
        let l2Tables = roundUp(dataClusters, Int64(opts.l2Entries)) / Int64(opts.l2Entries)
        guard l2Tables <= maxL1Entries else {
            throw FerryError(.invalidArgument, "The image size is too large (try using a larger cluster size)")
        }
        let l1Clusters = roundUp(l2Tables * 8, cs) / cs
        let metadata = 1 + l2Tables + l1Clusters
        let refcounts = QCOW2Writer.refcountRegion(clusters: dataClusters + metadata, clusterSize: cs, refcountOrder: opts.refcountOrder)
        let fully = (metadata + refcounts.blocks + refcounts.table) * cs + aligned
        let required: Int64
        if opts.preallocation == "full" || opts.preallocation == "falloc" {
            required = fully
        } else {
            required = fully - aligned + (try await source.dataBytes?(cs) ?? 0)
        }
        var bitmaps: Int64?
        if opts.version >= 3, let list = source.bitmaps {
            bitmaps = bitmapsSize(list, size: source.size, clusterSize: cs)
        }
        return SizeMeasurement(required: required, fullyAllocated: fully, bitmaps: bitmaps)
    }

    /// The largest L1 table qemu opens (32 MiB of entries).
    static let maxL1Entries = Int64(32 << 20) / 8

    /// Each bitmap's bits and its table in whole clusters, and the directory of their
    /// entries (24 bytes and the name, padded to 8) in whole clusters.
    static func bitmapsSize(_ list: [QCOW2Bitmap], size: Int64, clusterSize cs: Int64) -> Int64 {
        guard !list.isEmpty else { return 0 }
        var total: Int64 = 0
        var directory: Int64 = 0
        for b in list {
            let granularity = max(1, b.granularity)
            let bits = roundUp(size, granularity) / granularity
            let dataClusters = roundUp(roundUp(bits, 8) / 8, cs) / cs
            let tableClusters = roundUp(dataClusters * 8, cs) / cs
            total += (dataClusters + tableClusters) * cs
            directory += roundUp(24 + Int64(b.name.utf8.count), 8)
        }
        return total + roundUp(directory, cs)
    }

    private static func roundUp(_ v: Int64, _ to: Int64) -> Int64 { (v + to - 1) / to * to }
}
