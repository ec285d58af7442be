import FerryCore

/// One unit of work for a worker: a range of the source and what to do with it.
struct CopyRequest: Sendable, Equatable {
    enum Kind: Sendable, Equatable {
        /// Read from the source, scan for zeros, write.
        case data
        /// The source reads as zeros here.
        case zero
        /// The source does not allocate this range in its top layer.
        case unallocated
    }
    var seq: Int
    var offset: Int64
    var length: Int64
    var kind: Kind
    /// Of a data request, the bytes of short holes read along with the data around them
    /// (see `Planner.bridge`): not data of the source.
    var bridged: Int64 = 0
    var end: Int64 { offset + length }
}

/// Walks the source's extents a window at a time and cuts them into requests, in ascending
/// order, each numbered by `seq` for the write sequencer.
///
/// Requests never cross an `alignment` boundary in a way the devices can't take: boundaries
/// of requests are multiples of `alignment` (the larger of the two devices'), except at the
/// end of the source. Where an extent boundary is not aligned, the block that straddles it is
/// treated as data (reading zeros is harmless; skipping data is not).
///
/// On a source where reading a hole costs no I/O, a data request reaches across short zero
/// runs (and unallocated ones, when the copy takes them for zeros) to the data after them
/// (`bridge`): one read instead of several small ones. The worker's zero scan still finds
/// each hole, in whole granules, so the target gets what a zero request would have given it.
actor Planner {
    let source: any BlockDevice
    let end: Int64
    let alignment: Int64
    /// Longest data request: one worker buffer.
    let maxData: Int64
    /// Longest zero request: zeroing is cheap, but progress and cancellation want bounds.
    let maxZero: Int64
    /// How far ahead to ask the source for extents at a time.
    let window: Int64
    /// Longest zero run a data request reads across; 0 never.
    let bridge: Int64
    /// Zero runs bridged start and end on multiples of this (the zero scan's granule).
    let granule: Int64
    /// Whether `.unallocated` runs are bridged too: only when the copy treats them as zeros.
    let bridgeUnallocated: Bool

    private var cursor: Int64 = 0
    private var seq = 0
    /// Known extents from `cursor` on, clipped to the window they were fetched for.
    private var known: [Extent] = []
    private var knownIndex = 0
    private var fetching: Task<Void, any Error>?
    /// Whether the first fetch has finished (answered or failed).
    private var firstFetched = false
    /// The data bytes of the whole source, when the first fetch's answer covered all of it.
    private var wholeData: Int64?

    init(source: any BlockDevice, alignment: Int, maxData: Int, maxZero: Int64 = 1 << 30, window: Int64 = 1 << 30,
         bridge: Int64 = 0, granule: Int = 1, bridgeUnallocated: Bool = false) {
        precondition(granule > 0)
        self.source = source
        self.end = source.size
        self.alignment = Int64(alignment)
        self.maxData = Int64(maxData)
        self.maxZero = max(maxZero, Int64(maxData))
        self.window = window
        self.bridge = bridge
        self.bridgeUnallocated = bridgeUnallocated
        // Bridged runs keep to the alignment too, so rounding a request down never cuts one.
        self.granule = Int64(granule) * Int64(alignment) / Int64(Self.gcd(granule, alignment))
    }

    private static func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }

    /// The next request, or nil when the whole source has been handed out.
    func next() async throws -> CopyRequest? {
        while true {
            if cursor >= end { return nil }
            if let r = cut() { return r }
            if let f = fetching {
                try await f.value
            } else {
                let from = knownEnd
                let task = Task { try await self.fetch(from: from) }
                fetching = task
                try await task.value
            }
        }
    }

    /// Starts asking the source for its first extents without waiting for them, so that the
    /// question is on its way before the workers start (and before the data is counted):
    /// over the network each is a round trip before the first request.
    func prefetch() {
        guard fetching == nil, known.isEmpty, cursor < end else { return }
        let from = knownEnd
        fetching = Task { try await self.fetch(from: from) }
    }

    /// The data bytes of the whole source if the first window's answer covered all of it
    /// (an image of up to `window` whose map came in one go), else nil: then the count walks
    /// the map itself. Waits for that answer; never asks the source anything.
    func dataOfWholeSource() async -> Int64? {
        if !firstFetched { _ = try? await fetching?.value }
        return wholeData
    }

    /// Waits for a fetch under way (its error is the next `next()`'s to meet): a copy that
    /// stops before its first request leaves nothing asking the source once it returns.
    func settle() async {
        _ = try? await fetching?.value
    }

    /// End of what `known` covers.
    private var knownEnd: Int64 { known.last?.end ?? cursor }

    private func fetch(from: Int64) async throws {
        // Cleared here, not by the caller: waiters must never find a finished task.
        defer {
            fetching = nil
            firstFetched = true
        }
        guard from < end, from == knownEnd else { return }
        let upTo = min(end, from + window)
        // One query, or a few until something is known: the window bounds memory and the
        // source may answer for less than was asked.
        var got: [Extent] = []
        var pos = from
        while pos < upTo && got.count < 4096 {
            let batch = try await source.extents(in: pos ..< upTo)
            guard let head = batch.first, head.offset == pos, head.length > 0 else {
                throw FerryError(.corrupt, "extents at offset \(pos) do not start where asked", path: source.name, offset: pos)
            }
            for var e in batch {
                guard e.offset == pos, e.length > 0 else {
                    throw FerryError(.corrupt, "extents are not contiguous at offset \(pos)", path: source.name, offset: pos)
                }
                e.length = min(e.end, end) - e.offset
                got.append(e)
                pos = e.end
                if pos >= end { break }
            }
        }
        if !firstFetched && from == 0 && pos >= end {
            wholeData = got.reduce(0) { $0 + ($1.kind == .data ? $1.length : 0) }
        }
        let kept = Array(known[knownIndex...])
        known = (kept + got).coalesced()
        knownIndex = 0
    }

    /// Cuts the next request from known extents, or nil if more extents are needed first.
    private func cut() -> CopyRequest? {
        // Drop extents entirely behind the cursor.
        while knownIndex < known.count && known[knownIndex].end <= cursor { knownIndex += 1 }
        guard knownIndex < known.count else { return nil }
        let first = known[knownIndex]
        let limit = first.kind == .data ? maxData : maxZero
        var stop = min(first.end, cursor + limit, end)
        var kind: CopyRequest.Kind
        switch first.kind {
        case .data: kind = .data
        case .zero: kind = .zero
        case .unallocated: kind = .unallocated
        }
        // End of the last data extent the request reaches into.
        var dataEnd = first.end
        var bridged: Int64 = 0
        if kind == .data && bridge > 0 {
            var i = knownIndex
            while stop == dataEnd && i + 2 < known.count {
                let gap = known[i + 1], next = known[i + 2]
                guard gap.kind == .zero || (gap.kind == .unallocated && bridgeUnallocated),
                      gap.length <= bridge, gap.offset % granule == 0, gap.length % granule == 0,
                      next.kind == .data, cursor + limit > next.offset else { break }
                stop = min(next.end, cursor + limit, end)
                dataEnd = next.end
                bridged += gap.length
                i += 2
            }
        }
        if kind == .data && stop == dataEnd && stop < end && stop % alignment != 0 {
            // Data wins: take the rest of the block the data ends in.
            let up = min(end, (stop / alignment + 1) * alignment)
            if knownEnd >= up { stop = up }
        }
        if stop < end && stop % alignment != 0 {
            let aligned = stop / alignment * alignment
            if aligned > cursor {
                stop = aligned
            } else {
                // The extent ends inside one aligned block: read that block as data, if
                // everything up to its end is known.
                let blockEnd = min(end, (cursor / alignment + 1) * alignment)
                guard knownEnd >= blockEnd || knownEnd >= end else { return nil }
                kind = .data
                stop = blockEnd
            }
        }
        let r = CopyRequest(seq: seq, offset: cursor, length: stop - cursor, kind: kind, bridged: bridged)
        seq += 1
        cursor = stop
        return r
    }
}
