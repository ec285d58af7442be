import FerryCore

/// One L2 table, decoded to host byte order (for extended L2 entries, two words per entry:
/// the descriptor, then the subcluster bitmap).
final class L2Table: Sendable {
    let words: [UInt64]
    init(words: [UInt64]) { self.words = words }
}

/// A bounded cache of L2 tables keyed by their offset in the file.
///
/// At most `capacity` tables are kept; the least recently used one goes first. A table being
/// loaded is remembered as its loading task, so that concurrent misses of the same table read
/// it once and all wait for that read. The lock is held only to look up and update the map,
/// never across a read. (A pthread mutex, `Locked`, so that ThreadSanitizer sees it.)
final class L2Cache: Sendable {
    private enum Slot {
        case loading(Task<L2Table, any Error>)
        case ready(L2Table, lastUse: UInt64)
    }
    private struct State {
        var slots: [Int64: Slot] = [:]
        var clock: UInt64 = 0
        var loads = 0
    }
    private let state = Locked(State())
    let capacity: Int
    private let load: @Sendable (Int64) async throws -> L2Table

    init(capacity: Int, load: @escaping @Sendable (Int64) async throws -> L2Table) {
        self.capacity = max(1, capacity)
        self.load = load
    }

    /// How many tables were read from the file (for tests).
    var loads: Int { state.withLock { $0.loads } }
    /// How many tables are cached now (for tests).
    var count: Int { state.withLock { $0.slots.count } }

    func table(at offset: Int64) async throws -> L2Table {
        enum Next { case ready(L2Table), wait(Task<L2Table, any Error>) }
        let load = self.load
        let next: Next = state.withLock { s in
            s.clock += 1
            switch s.slots[offset] {
            case .ready(let t, _)?:
                s.slots[offset] = .ready(t, lastUse: s.clock)
                return .ready(t)
            case .loading(let task)?:
                return .wait(task)
            case nil:
                s.loads += 1
                let task = Task { try await load(offset) }
                s.slots[offset] = .loading(task)
                return .wait(task)
            }
        }
        switch next {
        case .ready(let t):
            return t
        case .wait(let task):
            do {
                let t = try await task.value
                state.withLock { s in
                    if case .loading? = s.slots[offset] {
                        s.slots[offset] = .ready(t, lastUse: s.clock)
                        Self.evict(&s, capacity: capacity)
                    }
                }
                return t
            } catch {
                state.withLock { s in
                    if case .loading? = s.slots[offset] { s.slots[offset] = nil }
                }
                throw error
            }
        }
    }

    private static func evict(_ s: inout State, capacity: Int) {
        while s.slots.count > capacity {
            var oldest: (key: Int64, use: UInt64)?
            for (k, v) in s.slots {
                if case .ready(_, let use) = v, oldest == nil || use < oldest!.use { oldest = (k, use) }
            }
            guard let o = oldest else { return }
            s.slots[o.key] = nil
        }
    }
}
