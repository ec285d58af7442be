#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// A page-aligned, fixed-size block of memory owned by one task at a time.
///
/// Aligned to 4096 so it can be handed to O_DIRECT reads and writes as it is.
public final class AlignedBuffer: @unchecked Sendable {
    public static let alignment = 4096
    public let count: Int
    public let base: UnsafeMutableRawPointer

    public init(count: Int) {
        precondition(count > 0)
        var p: UnsafeMutableRawPointer?
        // No MADV_HUGEPAGE: on a VM whose memory the host backs as it is first touched
        // (Firecracker here), 128 MiB of fresh huge pages took 124-512 ms to fault in (11-15
        // ms when reused), against a steady 70-117 ms in 4 KiB pages; an NBD copy's loop
        // threads spent most of their CPU there when its buffers came fresh.
        let rc = posix_memalign(&p, AlignedBuffer.alignment, count)
        guard rc == 0, let p else { fatalError("out of memory allocating \(count) bytes") }
        base = p
        self.count = count
    }

    deinit { free(base) }

    public var mutableBytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: count) }
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }

    public func slice(_ range: Range<Int>) -> UnsafeMutableRawBufferPointer {
        precondition(range.lowerBound >= 0 && range.upperBound <= count)
        return UnsafeMutableRawBufferPointer(start: base + range.lowerBound, count: range.count)
    }
}

/// A bounded pool of equal `AlignedBuffer`s: at most `capacity` exist at once, so the memory
/// of a copy is `capacity x bufferSize` whatever the image size. `take` waits while all are out.
public final class BufferPool: Sendable {
    public let bufferSize: Int
    public let capacity: Int

    private struct State {
        var free: [AlignedBuffer] = []
        var allocated = 0
        var peakAllocated = 0
        var waiters: [CheckedContinuation<AlignedBuffer, Never>] = []
    }
    private let state = Mutex(State())

    public init(bufferSize: Int, capacity: Int) {
        precondition(bufferSize > 0 && capacity > 0)
        self.bufferSize = bufferSize
        self.capacity = capacity
    }

    /// Most buffers that ever existed at once.
    public var peakAllocated: Int { state.withLock { $0.peakAllocated } }

    public func take() async -> AlignedBuffer {
        enum Next { case ready(AlignedBuffer), allocate, wait }
        let next: Next = state.withLock { s in
            if let b = s.free.popLast() { return .ready(b) }
            if s.allocated < capacity {
                s.allocated += 1
                s.peakAllocated = max(s.peakAllocated, s.allocated)
                return .allocate
            }
            return .wait
        }
        switch next {
        case .ready(let b): return b
        case .allocate: return AlignedBuffer(count: bufferSize)
        case .wait:
            return await withCheckedContinuation { c in
                let ready: AlignedBuffer? = state.withLock { s in
                    if let b = s.free.popLast() { return b }
                    s.waiters.append(c)
                    return nil
                }
                if let ready { c.resume(returning: ready) }
            }
        }
    }

    public func give(_ buffer: AlignedBuffer) {
        precondition(buffer.count == bufferSize)
        let waiter: CheckedContinuation<AlignedBuffer, Never>? = state.withLock { s in
            if !s.waiters.isEmpty { return s.waiters.removeFirst() }
            s.free.append(buffer)
            return nil
        }
        waiter?.resume(returning: buffer)
    }
}

extension BlockDevice {
    /// Writes a byte array (a convenience for tests and small metadata, not the hot path).
    public func write(at offset: Int64, bytes: [UInt8], flags: WriteFlags = []) async throws {
        guard !bytes.isEmpty else { return }
        let buffer = AlignedBuffer(count: bytes.count)
        bytes.withUnsafeBytes { buffer.mutableBytes.copyMemory(from: $0) }
        try await write(at: offset, from: buffer.bytes, flags: flags)
    }

    /// Reads `count` bytes into a new array (a convenience, not the hot path).
    public func read(at offset: Int64, count: Int) async throws -> [UInt8] {
        guard count > 0 else { return [] }
        let buffer = AlignedBuffer(count: count)
        try await read(at: offset, into: buffer.mutableBytes)
        return Array(buffer.bytes)
    }
}
