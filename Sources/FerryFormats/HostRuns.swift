import FerryCore

/// A run of a layer's mapping: guest `offset ..< offset + length`, stored at `host` in a file
/// (or nowhere: zeros, unallocated, a hole).
protocol MappedRun {
    var offset: Int64 { get }
    var length: Int64 { get set }
    var host: Int64? { get }
    /// True if `next`, starting where this run ends, is of the same kind: where their host
    /// bytes continue each other too (or neither has any), the two are one run.
    func joins(_ next: Self) -> Bool
}

extension Array where Element: MappedRun {
    /// Appends `run`, or lengthens the last run when `run` continues it in the guest, is of a
    /// kind that `joins` it, and continues it in the host file (or neither has host bytes).
    /// Empty runs are dropped.
    mutating func appendJoining(_ run: Element) {
        guard run.length > 0 else { return }
        if let last = self.last, last.offset + last.length == run.offset, last.joins(run) {
            switch (last.host, run.host) {
            case (nil, nil):
                self[count - 1].length += run.length
                return
            case let (a?, b?) where a + last.length == b:
                self[count - 1].length += run.length
                return
            default:
                break
            }
        }
        append(run)
    }
}

/// A data run to read: the device it lies in, where, and its part of the caller's buffer.
/// The parts of one `read` are disjoint, and every read of them finishes before `read` returns.
struct HostRead: @unchecked Sendable {
    let device: any BlockDevice
    let host: Int64
    let buffer: UnsafeMutableRawBufferPointer
}

/// Reads every run at once: a request read across holes (see the copy planner) has several,
/// and in turn they would cost a round trip each.
func readTogether(_ reads: [HostRead]) async throws {
    guard reads.count > 1 else {
        if let only = reads.first { try await readHost(only.device, at: only.host, into: only.buffer) }
        return
    }
    try await withThrowingTaskGroup(of: Void.self) { group in
        for r in reads { group.addTask { try await readHost(r.device, at: r.host, into: r.buffer) } }
        try await group.waitForAll()
    }
}

/// Reads `dst.count` bytes of a backing image from `offset`: zeros where there is none, or
/// past its end.
func readFromBacking(_ backing: (any BlockDevice)?, at offset: Int64, into dst: UnsafeMutableRawBufferPointer) async throws {
    guard let backing, offset < backing.size else {
        dst.initializeMemory(as: UInt8.self, repeating: 0)
        return
    }
    let n = Int(min(Int64(dst.count), backing.size - offset))
    try await readHost(backing, at: offset, into: UnsafeMutableRawBufferPointer(rebasing: dst[0 ..< n]))
    if n < dst.count {
        UnsafeMutableRawBufferPointer(rebasing: dst[n...]).initializeMemory(as: UInt8.self, repeating: 0)
    }
}

/// Appends the extents of guest `range`, which a layer leaves unallocated, as the whole chain
/// reads it: the backing image's extents where it has any, unallocated past its end (or
/// everywhere without one).
func appendFallThroughExtents(_ range: Range<Int64>, backing: (any BlockDevice)?, to out: inout [Extent]) async throws {
    guard let backing, range.lowerBound < backing.size else {
        out.append(Extent(offset: range.lowerBound, length: range.upperBound - range.lowerBound, kind: .unallocated))
        return
    }
    let bEnd = min(range.upperBound, backing.size)
    try await backing.forEachExtent(in: range.lowerBound ..< bEnd) { out.append($0) }
    if bEnd < range.upperBound { out.append(Extent(offset: bEnd, length: range.upperBound - bEnd, kind: .unallocated)) }
}

/// Closes a layer's file and its backing image, both even when the first fails; throws the
/// first error.
func closeLayer(file: any BlockDevice, backing: (any BlockDevice)?) async throws {
    var firstError: (any Error)?
    do { try await file.close() } catch { firstError = error }
    if let backing { do { try await backing.close() } catch { firstError = firstError ?? error } }
    if let firstError { throw firstError }
}

/// Where one run of a layer's read comes from.
enum RunSource {
    /// The layer's file, from this offset.
    case host(Int64)
    case zeros
    /// The backing image at the same guest offset (zeros past its end, or with none).
    case backing
}

/// Reads guest `offset ..< offset + buffer.count` of a layer through its `runs`, batch by
/// batch, every file and backing read of a batch sent together (`readTogether`), holes zeroed.
/// Runs must continue each other from where they were asked: a mapping that does not is
/// corrupt, not a reason to loop.
func readMapped<R: MappedRun>(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, layer name: String, format: String,
                              file: any BlockDevice, backing: (any BlockDevice)?,
                              runs: (Range<Int64>) async throws -> [R], source: (R) -> RunSource) async throws {
    let end = offset + Int64(buffer.count)
    var pos = offset
    while pos < end {
        var reads: [HostRead] = []
        let batchStart = pos
        for r in try await runs(pos ..< end) {
            guard r.offset == pos, r.length > 0 else { break }
            let n = Int(min(r.offset + r.length, end) - pos)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(pos - offset) ..< Int(pos - offset) + n])
            switch source(r) {
            case .host(let host):
                reads.append(HostRead(device: file, host: host, buffer: dst))
            case .zeros:
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            case .backing:
                let m = backing.map { Int(max(0, min(Int64(n), $0.size - pos))) } ?? 0
                if let backing, m > 0 {
                    reads.append(HostRead(device: backing, host: pos, buffer: UnsafeMutableRawBufferPointer(rebasing: dst[0 ..< m])))
                }
                if m < n { UnsafeMutableRawBufferPointer(rebasing: dst[m...]).initializeMemory(as: UInt8.self, repeating: 0) }
            }
            pos += Int64(n)
            if pos >= end { break }
        }
        guard pos > batchStart else {
            throw FerryError(.corrupt, "\(format) mapping does not cover guest offset \(pos)", path: name, offset: pos)
        }
        try await readTogether(reads)
    }
}

/// Adds a piece of a write: `count` bytes of the caller's buffer from `from`, going to `host`;
/// joined to the last piece when it continues it both in the buffer and in the file.
func appendJoining(_ runs: inout [(host: Int64, from: Int, count: Int)], host: Int64, from: Int, count: Int) {
    if let last = runs.last, last.host + Int64(last.count) == host, last.from + last.count == from {
        runs[runs.count - 1].count += count
    } else {
        runs.append((host, from, count))
    }
}
