import Synchronization

/// A sparse device in memory: the reference implementation of `BlockDevice`, for tests and
/// for embedders that want a scratch disk.
///
/// Storage is kept in chunks of `chunkSize` bytes; a chunk that was never written (or was
/// punched out) takes no memory and reports as `.zero` (or `.unallocated`, if
/// `holesAreUnallocated`). Tests can make it slow (`latency`), make it fail (`failure`), and
/// read back every operation it received (`operations`).
public final class MemoryDevice: HandsOverWrites, @unchecked Sendable {
    public enum Operation: Sendable, Equatable {
        case read(offset: Int64, length: Int64)
        case write(offset: Int64, length: Int64)
        case zero(offset: Int64, length: Int64, flags: ZeroFlags)
        case discard(offset: Int64, length: Int64)
        case flush

        /// Offset and length, for all but flush.
        public var range: (Int64, Int64)? {
            switch self {
            case .read(let o, let l), .write(let o, let l), .zero(let o, let l, _), .discard(let o, let l): return (o, l)
            case .flush: return nil
            }
        }
    }

    /// Makes requests that touch `range` fail with an I/O error.
    public struct Failure: Sendable {
        public var range: Range<Int64>
        public var onRead: Bool
        public var onWrite: Bool
        public init(range: Range<Int64>, onRead: Bool = true, onWrite: Bool = true) {
            self.range = range
            self.onRead = onRead
            self.onWrite = onWrite
        }
    }

    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let chunkSize: Int
    public let holesAreUnallocated: Bool
    /// Time every request takes, to stand in for a network round trip.
    public let latency: Duration?
    /// Up to this much more, chosen at random per request, so requests finish out of order.
    public let jitter: Duration?

    private struct State {
        var chunks: [Int64: [UInt8]] = [:]
        var operations: [Operation] = []
        var failure: Failure?
        var inFlight = 0
        var peakInFlight = 0
        var closed = false
    }
    private let state = Mutex(State())

    public init(
        name: String = "memory",
        size: Int64,
        chunkSize: Int = 4096,
        limits: BlockLimits = BlockLimits(alignment: 1, preferredTransfer: 64 << 10, maximumTransfer: 32 << 20),
        capabilities: BlockCapabilities = [.write, .zero, .fastZero, .discard, .extents, .flush, .zeroInit],
        holesAreUnallocated: Bool = false,
        latency: Duration? = nil,
        jitter: Duration? = nil
    ) {
        precondition(size >= 0 && chunkSize > 0)
        self.name = name
        self.size = size
        self.chunkSize = chunkSize
        self.limits = limits
        self.capabilities = capabilities
        self.holesAreUnallocated = holesAreUnallocated
        self.latency = latency
        self.jitter = jitter
    }

    /// Every operation received so far, in the order they started.
    public var operations: [Operation] { state.withLock { $0.operations } }
    /// Most requests that were being served at once.
    public var peakInFlight: Int { state.withLock { $0.peakInFlight } }
    public var failure: Failure? {
        get { state.withLock { $0.failure } }
        set { state.withLock { $0.failure = newValue } }
    }
    public var isClosed: Bool { state.withLock { $0.closed } }

    /// A copy of the device's contents (for small test devices).
    public func contents() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(size))
        state.withLock { s in
            for (index, chunk) in s.chunks {
                let start = Int(index) * chunkSize
                let n = min(chunk.count, Int(size) - start)
                out.replaceSubrange(start ..< start + n, with: chunk[0 ..< n])
            }
        }
        return out
    }

    /// Offsets of the chunks that hold memory, ascending.
    public var allocatedChunks: [Int64] { state.withLock { $0.chunks.keys.sorted() }.map { $0 * Int64(chunkSize) } }

    // MARK: BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        try await begin(.read(offset: offset, length: Int64(buffer.count)))
        defer { end() }
        state.withLock { s in
            var done = 0
            while done < buffer.count {
                let pos = offset + Int64(done)
                let index = pos / Int64(chunkSize)
                let within = Int(pos % Int64(chunkSize))
                let n = min(chunkSize - within, buffer.count - done)
                let dest = UnsafeMutableRawBufferPointer(rebasing: buffer[done ..< done + n])
                if let chunk = s.chunks[index] {
                    chunk.withUnsafeBytes { src in dest.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[within ..< within + n])) }
                } else {
                    dest.initializeMemory(as: UInt8.self, repeating: 0)
                }
                done += n
            }
        }
    }

    /// Issued once recorded in `operations`, before the latency.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        try checkWritable()
        try checkRange(offset, Int64(buffer.count))
        try await begin(.write(offset: offset, length: Int64(buffer.count)), issued: issued)
        defer { end() }
        state.withLock { s in store(&s, offset: offset, count: buffer.count) { done, n in
            UnsafeRawBufferPointer(rebasing: buffer[done ..< done + n])
        } }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try await writeZeroes(at: offset, length: length, flags: flags, issued: {})
    }

    /// Issued once recorded in `operations`, before the latency.
    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags,
                            issued: @escaping @Sendable () -> Void) async throws {
        try checkWritable()
        try checkRange(offset, length)
        let refused = flags.contains(.fastOnly) && !capabilities.contains(.fastZero)
        try await begin(.zero(offset: offset, length: length, flags: flags), issued: refused ? nil : issued)
        defer { end() }
        if refused {
            throw FerryError(.notSupported, "fast zeroing is not supported", path: name, offset: offset)
        }
        state.withLock { s in
            if flags.contains(.mayUnmap) {
                punch(&s, offset: offset, length: length)
            } else {
                let zeros = [UInt8](repeating: 0, count: chunkSize)
                zeros.withUnsafeBytes { z in
                    store(&s, offset: offset, count: Int(length)) { _, n in UnsafeRawBufferPointer(rebasing: z[0 ..< n]) }
                }
            }
        }
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWritable()
        try checkRange(offset, length)
        try await begin(.discard(offset: offset, length: length))
        defer { end() }
        guard capabilities.contains(.discard) else { return }
        state.withLock { s in punch(&s, offset: offset, length: length) }
    }

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, Int64(range.count))
        guard capabilities.contains(.extents) else {
            return [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
        }
        let hole: ExtentKind = holesAreUnallocated ? .unallocated : .zero
        return state.withLock { s in
            var out: [Extent] = []
            var pos = range.lowerBound
            while pos < range.upperBound {
                let index = pos / Int64(chunkSize)
                let chunkEnd = min(size, (index + 1) * Int64(chunkSize))
                let kind: ExtentKind = s.chunks[index] != nil ? .data : hole
                if let last = out.last, last.kind == kind {
                    out[out.count - 1].length += chunkEnd - pos
                } else {
                    out.append(Extent(offset: pos, length: chunkEnd - pos, kind: kind))
                }
                pos = chunkEnd
            }
            return out
        }
    }

    public func flush() async throws {
        try await begin(.flush)
        end()
    }

    public func close() async throws {
        state.withLock { $0.closed = true }
    }

    // MARK: Internals

    private func checkWritable() throws {
        guard capabilities.contains(.write) else {
            throw FerryError(.readOnly, "device is read-only", path: name)
        }
    }

    private func begin(_ op: Operation, issued: (@Sendable () -> Void)? = nil) async throws {
        let fail: Bool = state.withLock { s in
            s.operations.append(op)
            s.inFlight += 1
            s.peakInFlight = max(s.peakInFlight, s.inFlight)
            guard let f = s.failure else { return false }
            switch op {
            case .read(let o, let l): return f.onRead && f.range.overlaps(o ..< o + l)
            case .write(let o, let l), .zero(let o, let l, _), .discard(let o, let l):
                return f.onWrite && f.range.overlaps(o ..< o + l)
            case .flush: return false
            }
        }
        issued?()
        var wait = latency ?? .zero
        if let jitter { wait += jitter * Double.random(in: 0 ... 1) }
        if wait > .zero {
            do { try await Task.sleep(for: wait) } catch { end(); throw error }
        }
        if case let .some((o, l)) = op.range, limits.alignment > 1 {
            let a = Int64(limits.alignment)
            if o % a != 0 || (l % a != 0 && o + l != size) {
                end()
                throw FerryError(.invalidArgument, "request \(o)+\(l) is not aligned to \(a)", path: name, offset: o)
            }
        }
        if fail {
            end()
            let offset: Int64
            switch op {
            case .read(let o, _), .write(let o, _), .zero(let o, _, _), .discard(let o, _): offset = o
            case .flush: offset = 0
            }
            throw FerryError(.io, "injected I/O error", path: name, offset: offset, errno: 5)
        }
    }

    private func end() { state.withLock { $0.inFlight -= 1 } }

    private func store(_ s: inout State, offset: Int64, count: Int, source: (Int, Int) -> UnsafeRawBufferPointer) {
        var done = 0
        while done < count {
            let pos = offset + Int64(done)
            let index = pos / Int64(chunkSize)
            let within = Int(pos % Int64(chunkSize))
            let n = min(chunkSize - within, count - done)
            var chunk = s.chunks.removeValue(forKey: index) ?? [UInt8](repeating: 0, count: chunkSize)
            chunk.withUnsafeMutableBytes { dst in
                UnsafeMutableRawBufferPointer(rebasing: dst[within ..< within + n]).copyMemory(from: source(done, n))
            }
            s.chunks[index] = chunk
            done += n
        }
    }

    private func punch(_ s: inout State, offset: Int64, length: Int64) {
        var pos = offset
        let end = offset + length
        while pos < end {
            let index = pos / Int64(chunkSize)
            let chunkStart = index * Int64(chunkSize)
            let chunkEnd = min(size, chunkStart + Int64(chunkSize))
            let n = min(chunkEnd, end) - pos
            if pos == chunkStart && n == chunkEnd - chunkStart {
                s.chunks[index] = nil
            } else if var chunk = s.chunks[index] {
                let within = Int(pos - chunkStart)
                for i in within ..< within + Int(n) { chunk[i] = 0 }
                s.chunks[index] = chunk
            }
            pos += n
        }
    }
}
