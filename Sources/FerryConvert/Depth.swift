import FerryCore
import Synchronization

/// How many requests a copy keeps in flight: a number the user gave (`-m`), or found while
/// copying (`workers` nil), under a cap on the bytes the buffers may hold.
struct DepthPlan: Sendable {
    /// Worker tasks started: each may hold one request and one buffer.
    let workers: Int
    /// Requests allowed in flight at the start.
    let initial: Int
    /// True when the limit follows the measured throughput.
    let adaptive: Bool

    /// Where an adaptive copy starts: qemu-img's best setting (-m 16), which a local copy
    /// does not need but does not mind, and which an NBD export gains from before the first
    /// measurement is in (bench/nbd.sh: -m 16 took 0.86-0.89 of -m 8's time); a server far
    /// away earns more as the copy measures it.
    static let adaptiveStart = 16
    /// Deepest an adaptive copy goes: past this the servers here gained nothing.
    static let adaptiveMaximum = 64

    /// Smallest buffer `fittedBufferSize` picks (nbdcopy's request size).
    static let smallestFitted = 256 << 10

    /// The buffer size of a copy that finds its depth and was given no buffer size: at most
    /// `bufferSize`, and small enough that the depth it starts at (`concurrency` or
    /// `adaptiveStart`) holds at most `window` bytes, but not below `smallestFitted`, the
    /// `alignment` or `atLeast`. A local copy starts 16 deep and keeps 1 MiB buffers; out of
    /// an NBD export (64 deep over four connections) 512 KiB ones took 0.78 and 0.63 of the
    /// time of 1 MiB ones into a local file at 0 and 2 ms (paired, 15 and 11 interleaved cold
    /// runs of 512 MiB, 256 KiB level with 512), and were level into an NBD export.
    static func fittedBufferSize(_ bufferSize: Int, window: Int, concurrency: Int, alignment: Int, atLeast: Int) -> Int {
        let fitted = min(bufferSize, max(smallestFitted, window / startDepth(concurrency: concurrency)))
        let aligned = max(alignment, fitted / alignment * alignment)
        return max(aligned, CopyEngine.roundUp(atLeast, to: alignment))
    }

    /// The depth an adaptive copy starts at, before the memory cap: as deep as the endpoints
    /// serve at once, and at least `adaptiveStart`.
    static func startDepth(concurrency: Int) -> Int { max(adaptiveStart, concurrency) }

    /// `concurrency`: what the endpoints serve at once (`BlockDevice.concurrency`); an
    /// adaptive copy starts at least that deep.
    init(workers fixed: Int?, bufferSize: Int, maxInFlight: Int, concurrency: Int = 1) {
        // Buffers (and a compressed twin when compressing) are what a request in flight holds.
        let byMemory = max(1, maxInFlight / max(bufferSize, 1))
        if let fixed {
            workers = fixed
            initial = min(fixed, byMemory)
            adaptive = false
        } else {
            workers = min(Self.adaptiveMaximum, byMemory)
            initial = min(Self.startDepth(concurrency: concurrency), workers)
            adaptive = workers > initial
        }
    }
}

/// Lets at most `limit` workers hold a request at once; the limit may change while they run.
///
/// A worker calls `enter()` before it takes a request and `leave()` once it is done with it,
/// so a request in flight always belongs to a worker inside the gate (ordered writes wait
/// only for workers that can go on). `close()` lets every waiting worker through with
/// `false`, for a copy that is stopping.
final class DepthGate: Sendable {
    private struct State {
        var limit: Int
        var inside = 0
        var peak = 0
        var closed = false
        var waiters: [CheckedContinuation<Bool, Never>] = []
    }
    private let state: Mutex<State>

    init(limit: Int) {
        precondition(limit > 0)
        state = Mutex(State(limit: limit))
    }

    var limit: Int { state.withLock { $0.limit } }
    /// Most workers that were inside at once.
    var peak: Int { state.withLock { $0.peak } }

    /// Waits for room; false if the gate was closed.
    func enter() async -> Bool {
        let admitted: Bool? = state.withLock { s in
            if s.closed { return false }
            guard s.inside < s.limit else { return nil }
            s.inside += 1
            s.peak = max(s.peak, s.inside)
            return true
        }
        if let admitted { return admitted }
        return await withCheckedContinuation { c in
            let now: Bool? = state.withLock { s in
                if s.closed { return false }
                if s.inside < s.limit {
                    s.inside += 1
                    s.peak = max(s.peak, s.inside)
                    return true
                }
                s.waiters.append(c)
                return nil
            }
            if let now { c.resume(returning: now) }
        }
    }

    func leave() {
        let wake: CheckedContinuation<Bool, Never>? = state.withLock { s in
            s.inside -= 1
            return Self.admitOne(&s)
        }
        wake?.resume(returning: true)
    }

    func setLimit(_ n: Int) {
        precondition(n > 0)
        var wake: [CheckedContinuation<Bool, Never>] = []
        state.withLock { s in
            s.limit = n
            while let c = Self.admitOne(&s) { wake.append(c) }
        }
        for c in wake { c.resume(returning: true) }
    }

    func close() {
        let waiting: [CheckedContinuation<Bool, Never>] = state.withLock { s in
            s.closed = true
            defer { s.waiters.removeAll() }
            return s.waiters
        }
        for c in waiting { c.resume(returning: false) }
    }

    private static func admitOne(_ s: inout State) -> CheckedContinuation<Bool, Never>? {
        guard !s.closed, s.inside < s.limit, !s.waiters.isEmpty else { return nil }
        s.inside += 1
        s.peak = max(s.peak, s.inside)
        return s.waiters.removeFirst()
    }
}

/// Finds the depth by climbing: every `window` it compares the bytes done with the window
/// before; a doubling that gained at least `gain` is kept and the next one tried, one that
/// did not is undone, and the climb is tried again after `holdWindows`. More depth than a
/// path needs costs memory, not time, so only the way up is searched.
struct DepthClimber: Sendable {
    let maximum: Int
    let gain: Double
    let holdWindows: Int
    private(set) var depth: Int
    private var previousDepth: Int
    private var previousRate: Double?
    private var probing = false
    private var hold = 0

    init(start: Int, maximum: Int, gain: Double = 1.10, holdWindows: Int = 8) {
        self.depth = start
        self.previousDepth = start
        self.maximum = maximum
        self.gain = gain
        self.holdWindows = holdWindows
    }

    /// The depth for the next window, given the rate (bytes per second) of the one that ended.
    mutating func next(rate: Double) -> Int {
        if probing {
            probing = false
            if let before = previousRate, rate < before * gain {
                depth = previousDepth
                hold = holdWindows
                previousRate = nil
                return depth
            }
        }
        if hold > 0 {
            hold -= 1
            return depth
        }
        guard depth < maximum else { return depth }
        previousDepth = depth
        previousRate = rate
        depth = min(maximum, depth * 2)
        probing = true
        return depth
    }
}

/// Spaces data requests so the copy moves at most `bytesPerSecond` (`-r`): each request
/// waits for the moment the ones before it have earned, so the rate is even, not bursts
/// at the start of each second.
final class Pacer: Sendable {
    private let nanosPerByte: Double
    private let next = Mutex<UInt64>(0)

    init(bytesPerSecond: Int) {
        precondition(bytesPerSecond > 0)
        nanosPerByte = 1e9 / Double(bytesPerSecond)
    }

    /// Waits until `bytes` more may go.
    func wait(for bytes: Int64) async throws {
        let now = monotonicNanoseconds()
        let start: UInt64 = next.withLock { n in
            let s = max(n, now)
            n = s + UInt64(Double(bytes) * nanosPerByte)
            return s
        }
        if start > now { try await Task.sleep(nanoseconds: start - now) }
    }
}
