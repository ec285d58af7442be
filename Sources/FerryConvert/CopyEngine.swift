import FerryCore
import FerryFormats
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How the engine copies, once the devices are open.
public struct CopyConfiguration: Sendable {
    /// Requests in flight, each with its own buffer (`-m`); nil finds the depth while
    /// copying (see `DepthPlan`).
    public var workers: Int? = nil
    /// Bytes per buffer: the largest data request.
    public var bufferSize: Int = Self.defaultBufferSize
    /// 1 MiB rather than 2: the buffers of a copy are mostly memory it touches for the first
    /// time, which this VM's host backs only then, and half of it cut a 512 MiB NBD copy's
    /// page faults from 29-30 thousand to 17.5 thousand and its time to 0.76 and 0.83 of the
    /// 2 MiB default's (two sets of 9 interleaved cold runs); local, NBD and NBD -> NBD copies
    /// took 0.92-0.96.
    public static let defaultBufferSize = 1 << 20
    /// When set, and neither `workers` nor a buffer pool is given, buffers shrink (to no less
    /// than `DepthPlan.smallestFitted`) until the depth the copy starts at holds at most this
    /// many bytes: endpoints that take many requests at once get more, smaller ones (see
    /// `DepthPlan.fittedBufferSize`). nil keeps `bufferSize`.
    public var requestWindow: Int? = nil
    /// What `convert` passes as `requestWindow` when no buffer size is given.
    public static let defaultRequestWindow = 32 << 20
    /// Most bytes the buffers of requests in flight may hold (as nbdcopy's `--queue-size`):
    /// caps the depth, given or found, so memory is known whatever `-m` says.
    public var maxInFlight: Int = 128 << 20
    /// Let writes complete in any order (`-W`: true), keep them in guest order (false), or
    /// let the target decide (nil: in any order where it says `.anyWriteOrder`).
    public var outOfOrder: Bool? = nil
    /// Data runs are copied by the kernel where source and target allow it (`-C`:
    /// `copy_file_range` between local files), without zero detection; elsewhere, or once
    /// the kernel refuses, the bytes are read and written.
    public var copyOffload: Bool = false
    /// Read errors of the source become zeros (`--salvage`), recorded in `CopyStats.salvaged`;
    /// otherwise the first one stops the copy.
    public var salvage: Bool = false
    /// Most data bytes read per second (`-r`), evenly spaced; nil for no limit. Zero runs
    /// move no data and are not counted.
    public var rateLimit: Int? = nil
    /// Seconds over which an adaptive copy measures its throughput before changing depth.
    public var depthWindow: Double = 0.2
    /// Zero-detection granularity; 0 writes every byte (fully allocated target).
    public var sparseSize: Int = 4096
    /// The target reads as zeros already, so zero runs need not be written.
    public var targetReadsZero: Bool = false
    /// Leave ranges the source does not allocate untouched (they stay unallocated over a
    /// backing file); otherwise they are copied as zeros.
    public var skipUnallocated: Bool = false
    /// Seconds between progress reports.
    public var progressInterval: Double = 0.1
    /// Takes the guest data of the copy as it passes (`--checksum`): data from the buffers,
    /// zero runs without reading, and ranges left to a backing file read for it alone.
    public var checksum: BlockHasher? = nil

    public init() {}
}

/// The copy engine: N workers take requests from a shared planner, read into their own
/// buffer, find the zeros, and write in order (or not, with `outOfOrder`).
///
/// Memory is `workers x bufferSize` whatever the size of the image.
public enum CopyEngine {
    /// Copies all of `source` to the start of `target` (which must be at least as large).
    ///
    /// Throws the first error any worker meets, after the others have stopped; the error names
    /// the device and offset. Cancellation of the calling task stops the copy with a
    /// `FerryError` of code `.cancelled` that says where it stopped.
    public static func copy(
        from source: any BlockDevice,
        to target: any BlockDevice,
        configuration: CopyConfiguration,
        pool: BufferPool? = nil,
        progress: (@Sendable (CopyStats) -> Void)? = nil
    ) async throws -> CopyStats {
        precondition((configuration.workers ?? 1) > 0 && configuration.bufferSize > 0 && configuration.maxInFlight > 0)
        guard target.size >= source.size else {
            throw FerryError(.tooSmall, "target is smaller (\(target.size) bytes) than the source (\(source.size) bytes)", path: target.name)
        }
        let alignment = max(source.limits.alignment, target.limits.alignment)
        let granularity = configuration.sparseSize == 0 ? 0 : roundUp(configuration.sparseSize, to: target.limits.alignment)
        let concurrency = max(source.concurrency, target.concurrency)
        var bufferSize = configuration.bufferSize
        if let window = configuration.requestWindow, configuration.workers == nil, pool == nil {
            bufferSize = DepthPlan.fittedBufferSize(bufferSize, window: window, concurrency: concurrency,
                                                    alignment: alignment, atLeast: granularity)
        }
        let maxData = min(bufferSize, source.limits.maximumTransfer) / alignment * alignment
        precondition(maxData > 0, "buffer smaller than the devices' alignment")
        let planner = Planner(source: source, alignment: alignment, maxData: maxData,
                              bridge: granularity > 0 && source.capabilities.contains(.cheapZeroReads) ? bridge : 0,
                              granule: max(granularity, 1), bridgeUnallocated: !configuration.skipUnallocated)
        let tracker = Tracker(virtualSize: source.size, interval: configuration.progressInterval, progress: progress)
        await planner.prefetch()
        // The data to copy is counted beside the copy, not before it: only progress needs the
        // total, and it waits for it. Counted first, a 1 TiB qcow2 with 2,048 L2 tables (cold)
        // was read twice over before a byte was copied: 1.5 times this copy's time. A count
        // that fails leaves the copy to meet the error itself, if it is real. When the
        // planner's first answer maps the whole source, the count is taken from it rather
        // than asked for again.
        let counting = Task { () -> Bool in
            do {
                if let mapped = await planner.dataOfWholeSource() {
                    tracker.setAllocated(mapped)
                } else {
                    tracker.setAllocated(try await countAllocated(source))
                }
                return true
            } catch {
                if !Task.isCancelled { tracker.setAllocated(source.size) }
                return false
            }
        }
        let compressor = (target as? ClusterCompressingDevice).flatMap { $0.compressesWrites ? $0 : nil }
        // Compressed clusters are appended, and a streamed target only grows: both in order,
        // whatever `outOfOrder` asks.
        let inOrder = compressor != nil || target.capabilities.contains(.sequentialWrites)
            || !(configuration.outOfOrder ?? target.capabilities.contains(.anyWriteOrder))
        let sequencer = inOrder ? Sequencer() : nil
        // A compressing worker holds a second buffer for what it compressed.
        let plan = DepthPlan(workers: configuration.workers, bufferSize: bufferSize * (compressor == nil ? 1 : 2),
                             maxInFlight: configuration.maxInFlight, concurrency: concurrency)
        let gate = DepthGate(limit: plan.initial)
        // Never more taken than the gate admits.
        let pool = pool ?? BufferPool(bufferSize: bufferSize, capacity: plan.workers)
        tracker.setDepth(plan.initial, maxInFlight: configuration.maxInFlight)
        let context = WorkerContext(
            source: source, target: target, configuration: configuration,
            granularity: granularity,
            planner: planner, sequencer: sequencer, tracker: tracker, pool: pool,
            compressedPool: compressor == nil ? nil : BufferPool(bufferSize: pool.bufferSize, capacity: pool.capacity), gate: gate,
            pacer: configuration.rateLimit.map { Pacer(bytesPerSecond: $0) },
            // Offloaded data never passes through a buffer, so a checksum needs it read.
            offload: configuration.copyOffload && compressor == nil && configuration.checksum == nil
                ? (source as? any RangeCopyingDevice).map { OffloadState($0) } : nil,
            compressor: compressor,
            failure: FirstFailure())
        let climber = plan.adaptive ? Task {
            await climb(gate: gate, tracker: tracker, start: plan.initial, maximum: plan.workers, window: configuration.depthWindow)
        } : nil
        defer { climber?.cancel() }

        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                let executor = workersExecutor(source: source, target: target, compressor: compressor,
                                               checksum: configuration.checksum)
                for _ in 0 ..< plan.workers {
                    group.addTask(executorPreference: executor) { try await context.run() }
                }
                do {
                    while try await group.next() != nil {}
                } catch {
                    group.cancelAll()
                    // Workers waiting for room would wait for ever.
                    gate.close()
                    // Let every worker stop before reporting, keeping the first real error.
                    while true {
                        do { if try await group.next() == nil { break } } catch {}
                    }
                    throw error
                }
            }
        } catch {
            counting.cancel()
            _ = await counting.value
            // Workers stopped before their first request leave the prefetch to wait for.
            await planner.settle()
            // A zero write that failed behind its worker stopped the others with cancellation.
            let error = context.failure.value ?? error
            // The counters as they stood, so a progress display ends where the copy did.
            let stats = tracker.finish()
            if error is CancellationError || (error as? FerryError)?.code == .cancelled || Task.isCancelled {
                throw FerryError(.cancelled, "copy interrupted: everything before offset \(stats.completedThrough) was copied (\(stats.doneBytes) of \(stats.allocatedBytes) data bytes done)", path: target.name, offset: stats.completedThrough)
            }
            if let e = error as? FerryError { throw e }
            throw FerryError(.io, "\(error)", path: source.name, offset: stats.completedThrough)
        }
        // A failed count left the image's size as the total: the data is what was copied.
        if !(await counting.value) { tracker.setAllocated(tracker.snapshot().doneBytes) }
        return tracker.finish()
    }

    /// Where the workers run: on the source's event loop when both ends have one (NBD), so
    /// a read goes out, and its completion resumes the worker, without a thread switch; only
    /// the write's hand-over and completion cross threads. NBD (2 ms reads) -> NBD memory took
    /// 0.93-0.98 of the time (cold, interleaved sets of 11-21 runs), with a third fewer
    /// context switches; on the target's loop, 1.04-1.06. NFS and iSCSI do not offer their
    /// loops: NFS has no block status, and the zero scan of every byte on its loop made
    /// NFS -> iSCSI 1.05-1.07. Never with compression or a checksum, whose CPU time would hold
    /// the loop up.
    static func workersExecutor(source: any BlockDevice, target: any BlockDevice,
                                compressor: (any ClusterCompressingDevice)?, checksum: BlockHasher?) -> (any TaskExecutor)? {
        guard compressor == nil, checksum == nil, target.completionExecutor != nil else { return nil }
        return source.completionExecutor
    }

    /// Changes the depth every `window` seconds by what the copy achieved (see `DepthClimber`).
    static func climb(gate: DepthGate, tracker: Tracker, start: Int, maximum: Int, window: Double) async {
        var climber = DepthClimber(start: start, maximum: maximum)
        var done = tracker.snapshot().doneBytes
        var t = Tracker.now()
        while !Task.isCancelled {
            do { try await Task.sleep(nanoseconds: UInt64(window * 1e9)) } catch { return }
            let now = Tracker.now()
            let d = tracker.snapshot().doneBytes
            // Nothing done yet (still planning, or one huge request): no rate to judge by.
            guard d > done else { continue }
            let depth = climber.next(rate: Double(d - done) / (now - t))
            (done, t) = (d, now)
            if depth != gate.limit {
                gate.setLimit(depth)
                tracker.setDepth(depth)
            }
        }
    }

    /// Data bytes of the source (what progress counts toward), walked extent by extent
    /// without keeping them.
    static func countAllocated(_ source: any BlockDevice) async throws -> Int64 {
        guard source.capabilities.contains(.extents) else { return source.size }
        var total: Int64 = 0
        try await source.forEachExtent(in: 0 ..< source.size) { e in
            if e.kind == .data { total += e.length }
        }
        return total
    }

    /// Longest hole read along with the data on both sides of it, where reading a hole costs
    /// no I/O: a memset and a scan of at most this much, instead of a request of its own.
    /// A 1 GiB raw -> qcow2 copy with 1,024 data runs of 64 KiB between holes of 64 KiB took
    /// 0.93 of the time (page cache dropped, 8 interleaved runs).
    static let bridge: Int64 = 256 << 10

    static func roundUp(_ n: Int, to alignment: Int) -> Int { (n + alignment - 1) / alignment * alignment }
}

/// For the writes of a request before its last: they pass no turn.
private let noHandOver: @Sendable () -> Void = {}

/// What every worker shares.
private struct WorkerContext: Sendable {
    let source: any BlockDevice
    let target: any BlockDevice
    let configuration: CopyConfiguration
    /// Zero-detection granule (a multiple of the target's alignment), 0 for none.
    let granularity: Int
    let planner: Planner
    let sequencer: Sequencer?
    let tracker: Tracker
    let pool: BufferPool
    /// The compressed twins of `pool`'s buffers, when the target compresses.
    let compressedPool: BufferPool?
    /// Admits workers to take requests, as many as the depth allows.
    let gate: DepthGate
    /// Holds data requests to the rate limit, if there is one.
    let pacer: Pacer?
    /// The source's copy offload, while it works (`-C`).
    let offload: OffloadState?
    /// The target when it compresses: clusters are compressed by each worker before its
    /// turn, and only appended in its turn.
    let compressor: (any ClusterCompressingDevice)?
    /// The first error of a zero write running behind its worker.
    let failure: FirstFailure

    /// Zero writes each worker may leave running behind it.
    static let zerosBehind = 4

    func run() async throws {
        try await withThrowingTaskGroup(of: Void.self) { behind in
            var running = 0
            while await gate.enter() {
                // Inside the gate from taking a request to finishing it (a zero run: to
                // handing it to a task of its own).
                let request: CopyRequest?
                do { request = try await step(behind: &behind, running: &running) } catch { gate.leave(); throw error }
                gate.leave()
                if request == nil { break }
            }
            while try await behind.next() != nil {}
        }
    }

    /// Takes the next request and does it: nil when there are no more.
    private func step(behind: inout ThrowingTaskGroup<Void, any Error>, running: inout Int) async throws -> CopyRequest? {
        guard let request = try await planner.next() else { return nil }
        try Task.checkCancellation()
        if failure.value != nil { throw CancellationError() }
        if let hasher = configuration.checksum,
           request.kind == .zero || (request.kind == .unallocated && !configuration.skipUnallocated) {
            hasher.addZeros(at: request.offset, length: request.length)
        }
        if writesZeroesBehind(request) {
            // A zero write needs no buffer: it waits for its turn and completes in a task of
            // its own while the worker goes on, so zero runs (half of a sparse image) do not
            // hold the requests in flight down to the depth.
            behind.addTask { try await zeroBehind(request) }
            running += 1
            if running >= Self.zerosBehind {
                _ = try await behind.next()
                running -= 1
            }
            return request
        }
        // Buffers belong to requests, not workers: only what is in flight holds memory.
        let buffer = await pool.take()
        defer { pool.give(buffer) }
        let compressed = await compressedPool?.take()
        defer { if let compressed { compressedPool?.give(compressed) } }
        do {
            try await handle(request, buffer: buffer, compressed: compressed)
        } catch let e as FerryError {
            throw e
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            throw FerryError(.io, "\(error)", path: target.name, offset: request.offset)
        }
        return request
    }

    /// Zero runs that become `writeZeroes` calls (not skipped, not written as bytes).
    private func writesZeroesBehind(_ r: CopyRequest) -> Bool {
        guard compressor == nil, configuration.sparseSize != 0, !configuration.targetReadsZero else { return false }
        return r.kind == .zero || (r.kind == .unallocated && !configuration.skipUnallocated)
    }

    /// A zero request written as `writeZeroes`, in its turn.
    private func zeroRun(_ r: CopyRequest) async throws {
        try await turn(r) { issued in
            try await target.writeZeroes(at: r.offset, length: r.length, flags: [.mayUnmap], issued: issued)
            tracker.complete(r, zeroed: r.length)
        }
    }

    private func zeroBehind(_ r: CopyRequest) async throws {
        do {
            try await zeroRun(r)
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            let e = (error as? FerryError) ?? FerryError(.io, "\(error)", path: target.name, offset: r.offset)
            // Its turn will never pass: stop the workers waiting for theirs.
            if failure.record(e) { sequencer?.fail() }
            throw e
        }
    }

    private func handle(_ r: CopyRequest, buffer: AlignedBuffer, compressed: AlignedBuffer?) async throws {
        var kind = r.kind
        if kind == .unallocated {
            if configuration.skipUnallocated {
                if let hasher = configuration.checksum { try await hashThrough(r, buffer: buffer, hasher) }
                try await turn(r) { _ in tracker.complete(r, skipped: r.length) }
                return
            }
            kind = .zero
        }
        if kind == .zero {
            if configuration.sparseSize == 0 {
                // Fully allocated: write real zeros.
                buffer.mutableBytes.initializeMemory(as: UInt8.self, repeating: 0)
                try await turn(r) { issued in
                    var pos = r.offset
                    while pos < r.end {
                        let n = Int(min(Int64(buffer.count), r.end - pos))
                        try await target.write(at: pos, from: UnsafeRawBufferPointer(buffer.slice(0 ..< n)), flags: [],
                                               issued: pos + Int64(n) == r.end ? issued : noHandOver)
                        pos += Int64(n)
                    }
                    tracker.complete(r, written: r.length)
                }
            } else if configuration.targetReadsZero {
                try await turn(r) { _ in tracker.complete(r, skipped: r.length) }
            } else {
                try await zeroRun(r)
            }
            return
        }

        // Data: read, find zeros, then write when it is our turn.
        let n = Int(r.length)
        let bytes = buffer.slice(0 ..< n)
        try await pacer?.wait(for: r.length - r.bridged)
        if let offload, offload.works, try await offloaded(r, offload: offload, buffer: bytes) { return }
        do {
            try await source.read(at: r.offset, into: bytes)
        } catch let e as FerryError where configuration.salvage && e.code != .cancelled {
            try await salvage(r.offset, into: bytes)
        }
        let runs: [ZeroScan.Run]
        if granularity == 0 {
            runs = [ZeroScan.Run(range: 0 ..< n, isZero: false)]
        } else {
            runs = ZeroScan.runs(in: UnsafeRawBufferPointer(bytes), at: r.offset, granularity: granularity)
        }
        // The checksum hashes the buffer on another thread while this one waits for its
        // turn and writes; both only read it, and it goes back to the pool after both.
        async let hashed: Void = Self.hash(configuration.checksum, buffer, runs, at: r.offset)
        // Compression, in this worker, before the turn to write.
        var pieces: [[CompressedPiece]] = []
        if let compressor, let compressed {
            var used = 0
            for run in runs where !run.isZero {
                let out = UnsafeMutableRawBufferPointer(rebasing: compressed.mutableBytes[used ..< used + run.range.count])
                var p = compressor.compress(UnsafeRawBufferPointer(rebasing: bytes[run.range]),
                                            at: r.offset + Int64(run.range.lowerBound), into: out)
                for k in p.indices { p[k].start += used }
                used += p.last.map { $0.start + $0.length - used } ?? 0
                pieces.append(p)
            }
        }
        try await turn(r) { issued in
            var written: Int64 = 0, zeroed: Int64 = 0, skipped: Int64 = 0
            if let compressor, let compressed {
                // Compressed clusters are appended one after another: each completes before the next.
                var dataRun = 0
                for run in runs {
                    if !run.isZero {
                        try await compressor.writeCompressed(pieces[dataRun], from: compressed.bytes)
                        dataRun += 1
                        written += Int64(run.range.count)
                    } else if configuration.targetReadsZero {
                        skipped += Int64(run.range.count)
                    } else {
                        try await target.writeZeroes(at: r.offset + Int64(run.range.lowerBound), length: Int64(run.range.count),
                                                     flags: [.mayUnmap], issued: noHandOver)
                        zeroed += Int64(run.range.count)
                    }
                }
            } else {
                // A request read across holes has a write per data run: sent together, in order.
                var writes: [PendingWrite] = []
                for run in runs {
                    let at = r.offset + Int64(run.range.lowerBound)
                    if !run.isZero {
                        writes += PendingWrite.pieces(UnsafeRawBufferPointer(rebasing: bytes[run.range]), at: at,
                                                      maximum: target.limits.maximumTransfer)
                        written += Int64(run.range.count)
                    } else if configuration.targetReadsZero {
                        skipped += Int64(run.range.count)
                    } else {
                        writes.append(PendingWrite(offset: at, kind: .zero(Int64(run.range.count), [.mayUnmap])))
                        zeroed += Int64(run.range.count)
                    }
                }
                try await target.writeInOrder(writes, issued: issued)
            }
            tracker.complete(r, read: r.length, written: written, zeroed: zeroed, skipped: skipped, data: r.length - r.bridged)
        }
        await hashed
    }

    private static func hash(_ hasher: BlockHasher?, _ buffer: AlignedBuffer, _ runs: [ZeroScan.Run], at offset: Int64) async {
        guard let hasher else { return }
        for run in runs {
            let at = offset + Int64(run.range.lowerBound)
            if run.isZero {
                hasher.addZeros(at: at, length: Int64(run.range.count))
            } else {
                hasher.add(at: at, UnsafeRawBufferPointer(rebasing: buffer.bytes[run.range]))
            }
        }
    }

    /// Reads a range the copy leaves to the target's backing file, for the checksum only.
    private func hashThrough(_ r: CopyRequest, buffer: AlignedBuffer, _ hasher: BlockHasher) async throws {
        var pos = r.offset
        while pos < r.end {
            let n = Int(min(Int64(buffer.count), r.end - pos))
            let bytes = buffer.slice(0 ..< n)
            try await source.read(at: pos, into: bytes)
            hasher.add(at: pos, UnsafeRawBufferPointer(bytes))
            pos += Int64(n)
        }
    }

    /// Has the kernel copy `r` in its turn; true when done. If it cannot, the request is read
    /// and written here (its turn is already taken) and offload is not tried again.
    private func offloaded(_ r: CopyRequest, offload: OffloadState, buffer: UnsafeMutableRawBufferPointer) async throws -> Bool {
        try await turn(r) { issued in
            if try await offload.device.copyRange(at: r.offset, length: r.length, to: target, at: r.offset) {
                issued()
            } else {
                offload.refused()
                try await source.read(at: r.offset, into: buffer)
                try await target.writeInOrder(PendingWrite.pieces(UnsafeRawBufferPointer(buffer), at: r.offset, maximum: target.limits.maximumTransfer),
                                              issued: issued)
            }
            tracker.complete(r, read: r.length, written: r.length, data: r.length - r.bridged)
        }
        return true
    }

    /// Reads what can be read of a request whose read failed: in pieces of 64 KiB, and a
    /// piece that fails in blocks of 4 KiB (or the source's alignment); a block that fails
    /// reads as zeros and is recorded.
    private func salvage(_ offset: Int64, into bytes: UnsafeMutableRawBufferPointer) async throws {
        let block = max(4096, source.limits.alignment)
        let piece = max(64 << 10, block)
        func tryRead(_ at: Int, _ n: Int) async throws -> Bool {
            do {
                try await source.read(at: offset + Int64(at), into: UnsafeMutableRawBufferPointer(rebasing: bytes[at ..< at + n]))
                return true
            } catch let e as FerryError where e.code != .cancelled {
                return false
            }
        }
        var at = 0
        while at < bytes.count {
            let n = min(piece, bytes.count - at)
            if try await !tryRead(at, n) {
                var b = at
                while b < at + n {
                    let m = min(block, at + n - b)
                    if try await !tryRead(b, m) {
                        UnsafeMutableRawBufferPointer(rebasing: bytes[b ..< b + m]).initializeMemory(as: UInt8.self, repeating: 0)
                        tracker.salvaged(offset + Int64(b), Int64(m))
                    }
                    b += m
                }
            }
            at += n
        }
    }

    /// Runs `body` when it is `r`'s turn to write (at once when out of order). The body
    /// passes the closure it gets to its last write, so the next request's turn starts as
    /// soon as that write is issued rather than when it completes: ordered writes still
    /// reach the target in order, several at a time. If the body never calls it, the turn
    /// passes when the body returns.
    private func turn(_ r: CopyRequest, _ body: (_ issued: @escaping @Sendable () -> Void) async throws -> Void) async throws {
        guard let sequencer else {
            try await body(noHandOver)
            return
        }
        try await sequencer.waitTurn(r.seq)
        let handOver = TurnHandOver(sequencer: sequencer, seq: r.seq)
        try await body(handOver.pass)
        handOver.pass()
    }
}


/// A source's copy offload and whether the kernel still accepts it.
final class OffloadState: Sendable {
    let device: any RangeCopyingDevice
    private let ok = Atomic<Bool>(true)
    init(_ device: any RangeCopyingDevice) { self.device = device }
    var works: Bool { ok.load(ordering: .relaxed) }
    func refused() { ok.store(false, ordering: .relaxed) }
}

/// The first error recorded, for errors met where no caller is waiting to receive them.
final class FirstFailure: Sendable {
    private let error = Mutex<(any Error)?>(nil)

    /// Records `e` unless an error was recorded before; true if it was the first.
    func record(_ e: any Error) -> Bool {
        error.withLock { stored in
            guard stored == nil else { return false }
            stored = e
            return true
        }
    }

    var value: (any Error)? { error.withLock { $0 } }
}

/// Counters and the completion watermark, shared by the workers.
final class Tracker: Sendable {
    private struct State {
        var stats = CopyStats()
        var lastReport: Double = 0
        /// Completed requests above the watermark, by sequence number: their end offsets.
        var pending: [Int: Int64] = [:]
        var nextSeq = 0
        /// The data to copy is counted: progress reports wait for it.
        var counted = false
    }
    private let state: Mutex<State>
    private let start: Double
    private let interval: Double
    private let progress: (@Sendable (CopyStats) -> Void)?

    init(virtualSize: Int64, interval: Double, progress: (@Sendable (CopyStats) -> Void)?) {
        var s = State()
        s.stats.virtualSize = virtualSize
        state = Mutex(s)
        start = Tracker.now()
        self.interval = interval
        self.progress = progress
    }

    static func now() -> Double { Double(monotonicNanoseconds()) / 1e9 }

    /// A range of the source that could not be read and was written as zeros.
    func salvaged(_ offset: Int64, _ length: Int64) {
        state.withLock { s in
            if let last = s.stats.salvaged.last, last.upperBound == offset {
                s.stats.salvaged[s.stats.salvaged.count - 1] = last.lowerBound ..< offset + length
            } else {
                s.stats.salvaged.append(offset ..< offset + length)
            }
        }
    }

    /// The depth now, and the cap on bytes in flight (reported with the progress).
    func setDepth(_ depth: Int, maxInFlight: Int? = nil) {
        state.withLock { s in
            s.stats.depth = depth
            s.stats.peakDepth = max(s.stats.peakDepth, depth)
            if let maxInFlight { s.stats.maxInFlight = maxInFlight }
        }
    }

    /// The data to copy, counted; the first progress report.
    func setAllocated(_ n: Int64) {
        state.withLock { s in
            s.stats.allocatedBytes = n
            s.counted = true
        }
        progress?(snapshot())
    }

    func complete(_ r: CopyRequest, read: Int64 = 0, written: Int64 = 0, zeroed: Int64 = 0, skipped: Int64 = 0, data: Int64 = 0) {
        let t = Tracker.now()
        let report: CopyStats? = state.withLock { s in
            s.stats.bytesRead += read
            s.stats.bytesWritten += written
            s.stats.bytesZeroed += zeroed
            s.stats.bytesSkipped += skipped
            s.stats.doneBytes += data
            s.pending[r.seq] = r.end
            while let end = s.pending.removeValue(forKey: s.nextSeq) {
                s.stats.completedThrough = end
                s.nextSeq += 1
            }
            guard progress != nil, s.counted, t - s.lastReport >= interval else { return nil }
            s.lastReport = t
            s.stats.elapsed = t - start
            return s.stats
        }
        if let report { progress?(report) }
    }

    func snapshot() -> CopyStats {
        let t = Tracker.now()
        return state.withLock { s in
            s.stats.elapsed = t - start
            return s.stats
        }
    }

    /// The final counters, also sent as the last progress report.
    func finish() -> CopyStats {
        let stats = snapshot()
        progress?(stats)
        return stats
    }
}
