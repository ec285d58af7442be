import FerryCore
import FerryFormats

#if canImport(Glibc)
import Glibc
#endif

/// How `compare` runs.
public struct CompareOptions: Sendable {
    /// `-s`: sizes must match, and so must allocation (the kind and extent of every run).
    public var strict = false
    /// Requests in flight, each reading one image at a time.
    public var workers = 32
    /// Largest single read of each image.
    public var chunkSize = 1 << 20
    /// How the images' storage is opened.
    public var endpoint = EndpointOptions(directIfCold: true)

    public init() {}
}

/// What `compare` found. Offsets are guest offsets, rounded down to the 512-byte sector the
/// first difference is in (as qemu-img reports them).
public struct CompareResult: Sendable, Equatable {
    public enum Verdict: Sendable, Equatable {
        case identical
        /// The first sector whose bytes differ (or, past the end of the smaller image, is not zero).
        case contentMismatch(offset: Int64)
        /// `-s`: the sizes differ.
        case sizeMismatch
        /// `-s`: the run starting here is allocated differently in the two images.
        case blockStatusMismatch(offset: Int64)
    }
    public var verdict: Verdict
    /// The images' sizes differ (in whole sectors, as qemu counts them).
    public var sizeMismatch: Bool
    public var size1: Int64
    public var size2: Int64
    /// Bytes read from both images together.
    public var bytesRead: Int64

    public var identical: Bool { verdict == .identical }
}

/// `ferry compare`: qemu-img compare's semantics over any images and endpoints, with many
/// requests in flight and extents used on both sides so that where neither image has data
/// nothing is read.
///
/// Without `strict`, the images are compared over the smaller size, and the larger one's tail
/// must read as zeros. With `strict`, sizes must match, and walking both images' allocation
/// (coalesced runs of data, zeros and unallocated) must give the same runs; the first
/// difference by offset, of content or of allocation, is the one reported.
public enum ImageCompare {
    /// qemu-img counts sizes in 512-byte sectors.
    static let sector: Int64 = 512

    public static func compare(_ a: ImageSpec, _ b: ImageSpec, options: CompareOptions = CompareOptions(),
                               progress: (@Sendable (_ done: Int64, _ total: Int64) -> Void)? = nil,
                               warning: (@Sendable (String) -> Void)? = nil) async throws -> CompareResult {
        let first = try await Images.open(a, readOnly: true, options: options.endpoint)
        let second: OpenedImage
        do {
            second = try await Images.open(b, readOnly: true, options: options.endpoint)
        } catch {
            try? await first.device.close()
            throw error
        }
        for image in [first, second] { image.passWarnings(to: warning) }
        do {
            let result = try await compare(first.device, second.device, options: options, progress: progress)
            try await first.device.close()
            try await second.device.close()
            return result
        } catch {
            try? await first.device.close()
            try? await second.device.close()
            throw error
        }
    }

    /// Compares two open devices.
    public static func compare(_ d1: any BlockDevice, _ d2: any BlockDevice, options: CompareOptions = CompareOptions(),
                               progress: (@Sendable (_ done: Int64, _ total: Int64) -> Void)? = nil) async throws -> CompareResult {
        precondition(options.workers > 0 && options.chunkSize > 0)
        let sectors1 = (d1.size + sector - 1) / sector, sectors2 = (d2.size + sector - 1) / sector
        var result = CompareResult(verdict: .identical, sizeMismatch: sectors1 != sectors2, size1: d1.size, size2: d2.size, bytesRead: 0)
        if options.strict && result.sizeMismatch {
            result.verdict = .sizeMismatch
            return result
        }
        let alignment = Int64(max(d1.limits.alignment, d2.limits.alignment))
        let transfer = min(options.chunkSize, d1.limits.maximumTransfer, d2.limits.maximumTransfer)
        let chunk = max(alignment, Int64(transfer) / alignment * alignment)
        let end = max(d1.size, d2.size)
        let planner = ComparePlanner(d1, d2, end: end, alignment: alignment, chunk: chunk, strict: options.strict)
        let counters = CompareCounters(total: end, progress: progress)
        // Buffers are taken per request, the last given back first: where reads come from the
        // page cache and never wait, the few in use stay in the CPU's caches, and memory is
        // what is in flight, not a pair per worker.
        let pool = BufferPool(bufferSize: Int(chunk), capacity: 2 * options.workers)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0 ..< options.workers {
                group.addTask {
                    while let r = try await planner.next() {
                        try Task.checkCancellation()
                        if r.skip {
                            counters.add(done: r.length, read: 0)
                            continue
                        }
                        let b1 = await pool.take(), b2 = await pool.take()
                        defer {
                            pool.give(b2)
                            pool.give(b1)
                        }
                        let n = Int(r.length)
                        // One side after the other: reading both at once (a child task per
                        // request) queued each worker's second read behind the other workers'
                        // tasks, so every worker held its buffers at once and a warm compare
                        // ran 1.3 times as long. Twice the workers keep as many reads in flight.
                        let read1 = try await fill(b1, from: d1, r, r.read1)
                        let read2 = try await fill(b2, from: d2, r, r.read2)
                        let p1 = UnsafeRawBufferPointer(b1.slice(0 ..< n)), p2 = UnsafeRawBufferPointer(b2.slice(0 ..< n))
                        let at: Int?
                        switch (r.read1, r.read2) {
                        case (true, true): at = firstDifference(p1, p2)
                        case (true, false): at = firstNonZero(p1)
                        case (false, true): at = firstNonZero(p2)
                        case (false, false): at = nil
                        }
                        if let at { await planner.found(r.offset + Int64(at)) }
                        counters.add(done: r.length, read: read1 + read2)
                    }
                }
            }
            // The first error stops the other workers; the group awaits them before it returns.
            do { try await group.waitForAll() } catch {
                group.cancelAll()
                throw error
            }
        }
        result.bytesRead = counters.read
        let (content, status) = await planner.outcome()
        if let content, content < (status ?? .max) {
            result.verdict = .contentMismatch(offset: content / sector * sector)
        } else if let status {
            result.verdict = .blockStatusMismatch(offset: status)
        }
        return result
    }

    /// Reads the request's range of `device` into `buffer` if `read`; what lies past the end
    /// of the device reads as zeros. Returns the bytes read.
    private static func fill(_ buffer: AlignedBuffer, from device: any BlockDevice, _ r: CompareRequest, _ read: Bool) async throws -> Int64 {
        guard read else { return 0 }
        let n = Int(r.length)
        let have = Int(max(0, min(r.end, device.size) - r.offset))
        if have > 0 {
            do {
                try await device.read(at: r.offset, into: buffer.slice(0 ..< have))
            } catch let e as FerryError {
                throw e.offset == nil ? FerryError(e.code, e.message, path: e.path ?? device.name, offset: r.offset) : e
            }
        }
        if have < n { buffer.slice(have ..< n).initializeMemory(as: UInt8.self, repeating: 0) }
        return Int64(have)
    }

    /// Index of the first byte that differs, or nil.
    static func firstDifference(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) -> Int? {
        let n = min(a.count, b.count)
        guard n > 0, let pa = a.baseAddress, let pb = b.baseAddress else { return nil }
        if memcmp(pa, pb, n) == 0 { return nil }
        var start = 0
        let step = 4096
        while start < n {
            let len = min(step, n - start)
            if memcmp(pa + start, pb + start, len) != 0 {
                for i in start ..< start + len where a[i] != b[i] { return i }
            }
            start += len
        }
        return nil
    }

    /// Index of the first non-zero byte, or nil.
    static func firstNonZero(_ a: UnsafeRawBufferPointer) -> Int? {
        if ZeroScan.isZero(a) { return nil }
        var start = 0
        let step = 4096
        while start < a.count {
            let len = min(step, a.count - start)
            if !ZeroScan.isZero(UnsafeRawBufferPointer(rebasing: a[start ..< start + len])) {
                for i in start ..< start + len where a[i] != 0 { return i }
            }
            start += len
        }
        return nil
    }
}

/// One piece of the comparison: a range, and which images must be read for it (an image not
/// read there reads as zeros).
struct CompareRequest: Sendable {
    var offset: Int64
    var length: Int64
    var read1: Bool
    var read2: Bool
    /// Neither image has data here: nothing to do but count it.
    var skip: Bool
    var end: Int64 { offset + length }
}

/// Progress and read counters shared by the workers.
final class CompareCounters: Sendable {
    private let state = Locked<(done: Int64, read: Int64)>((0, 0))
    let total: Int64
    let progress: (@Sendable (Int64, Int64) -> Void)?

    init(total: Int64, progress: (@Sendable (Int64, Int64) -> Void)?) {
        self.total = total
        self.progress = progress
    }

    func add(done: Int64, read: Int64) {
        let now = state.withLock { s -> Int64 in
            s.done += done
            s.read += read
            return s.done
        }
        progress?(now, total)
    }

    var read: Int64 { state.withLock { $0.read } }
}

/// Walks both images' extents in step and cuts the range into requests, in ascending order;
/// remembers the first difference found.
///
/// Request boundaries are multiples of `alignment` (except at the end); an extent boundary
/// inside an aligned block makes that block a request that reads both images.
actor ComparePlanner {
    private var side1: ExtentWalker
    private var side2: ExtentWalker
    private let end: Int64
    private let alignment: Int64
    private let chunk: Int64
    private let strict: Bool
    private var cursor: Int64 = 0
    /// The lowest offset of a content difference found so far.
    private var content: Int64?
    /// Where the allocation first differs (`strict`).
    private var status: Int64?

    init(_ d1: any BlockDevice, _ d2: any BlockDevice, end: Int64, alignment: Int64, chunk: Int64, strict: Bool) {
        side1 = ExtentWalker(d1)
        side2 = ExtentWalker(d2)
        self.end = end
        self.alignment = alignment
        self.chunk = chunk
        self.strict = strict
    }

    func found(_ offset: Int64) {
        content = min(content ?? .max, offset)
    }

    func outcome() -> (content: Int64?, status: Int64?) { (content, status) }

    /// Callers waiting while another one fetches extents (one cut at a time: the actor is
    /// reentrant across the awaits).
    private var busy = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func next() async throws -> CompareRequest? {
        while busy { await withCheckedContinuation { waiters.append($0) } }
        busy = true
        defer {
            busy = false
            if !waiters.isEmpty { waiters.removeFirst().resume() }
        }
        // Nothing past the first difference found matters.
        let limit = min(end, content ?? .max, status ?? .max)
        guard cursor < limit else { return nil }
        let pos = cursor
        var w1 = side1, w2 = side2
        let e1 = try await w1.run(at: pos), e2 = try await w2.run(at: pos)
        side1 = w1
        side2 = w2
        if strict && (e1.offset != e2.offset || e1.end != e2.end || e1.kind != e2.kind) {
            status = pos
            return nil
        }
        let data1 = e1.kind == .data, data2 = e2.kind == .data
        var stop = min(e1.end, e2.end, end)
        if data1 || data2 { stop = min(stop, pos + chunk) }
        var r = CompareRequest(offset: pos, length: 0, read1: data1, read2: data2, skip: !data1 && !data2)
        if stop < end && stop % alignment != 0 {
            let aligned = stop / alignment * alignment
            if aligned > pos {
                stop = aligned
            } else {
                // A run ends inside this block: read the whole block of both images.
                stop = min(end, (pos / alignment + 1) * alignment)
                r = CompareRequest(offset: pos, length: 0, read1: pos < side1.size, read2: pos < side2.size, skip: false)
            }
        }
        r.length = stop - pos
        cursor = stop
        return r
    }
}

/// One image's allocation walked front to back: the whole run (neighbouring extents of one
/// kind joined, across query batches) holding an offset. Past the end of the image, one run
/// of zeros. Keeps one batch of extents at a time.
struct ExtentWalker {
    let device: any BlockDevice
    var size: Int64 { device.size }
    private var batch: [Extent] = []
    private var index = 0

    init(_ device: any BlockDevice) { self.device = device }

    mutating func run(at pos: Int64) async throws -> Extent {
        if pos >= device.size { return Extent(offset: device.size, length: .max - device.size, kind: .zero) }
        while index < batch.count && batch[index].end <= pos { index += 1 }
        if index >= batch.count || batch[index].offset > pos {
            batch = try await fetch(from: pos)
            index = 0
        }
        // Join the runs of the same kind that follow, fetching further where the batch ends.
        while index + 1 >= batch.count, batch[index].end < device.size {
            let more = try await fetch(from: batch[index].end)
            guard more.first?.kind == batch[index].kind else {
                batch = [batch[index]] + more
                index = 0
                break
            }
            var joined = batch[index]
            joined.length += more[0].length
            batch = [joined] + more.dropFirst()
            index = 0
        }
        return batch[index]
    }

    private func fetch(from pos: Int64) async throws -> [Extent] {
        let got = try await device.extents(in: pos ..< device.size)
        guard let head = got.first, head.offset == pos, head.length > 0 else {
            throw FerryError(.corrupt, "extents at offset \(pos) do not start where asked", path: device.name, offset: pos)
        }
        var out: [Extent] = []
        var at = pos
        for var e in got {
            guard e.offset == at, e.length > 0 else {
                throw FerryError(.corrupt, "extents are not contiguous at offset \(at)", path: device.name, offset: at)
            }
            e.length = min(e.end, device.size) - e.offset
            out.append(e)
            at = e.end
            if at >= device.size { break }
        }
        return out.coalesced()
    }
}
