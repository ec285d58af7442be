/// One of several writes sent together by `BlockDevice.writeInOrder`: bytes the caller keeps
/// valid until that call returns, or a run to zero.
public struct PendingWrite: @unchecked Sendable {
    public enum Kind {
        case data(UnsafeRawPointer, Int)
        case zero(Int64, ZeroFlags)
    }
    public var offset: Int64
    public var kind: Kind

    public init(offset: Int64, kind: Kind) {
        self.offset = offset
        self.kind = kind
    }

    /// `bytes`, to be written at `offset`, in pieces of at most `maximum` bytes.
    public static func pieces(_ bytes: UnsafeRawBufferPointer, at offset: Int64, maximum: Int) -> [PendingWrite] {
        precondition(maximum > 0)
        guard let base = bytes.baseAddress else { return [] }
        return stride(from: 0, to: bytes.count, by: maximum).map { from in
            PendingWrite(offset: offset + Int64(from), kind: .data(base + from, min(maximum, bytes.count - from)))
        }
    }
}

extension BlockDevice {
    /// Issues `writes` in their order, each as soon as the one before it has been issued, and
    /// waits for all of them: awaiting each before sending the next costs a round trip per
    /// write on a network device. The last one passes `issued` on; a failed write passes
    /// nothing on, and the writes waiting after it are cancelled.
    public func writeInOrder(_ writes: [PendingWrite], issued: @escaping @Sendable () -> Void) async throws {
        guard writes.count > 1 else {
            if let only = writes.first { try await write(only, issued: issued) }
            return
        }
        let order = Sequencer()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (k, w) in writes.enumerated() {
                let last = k == writes.count - 1
                group.addTask {
                    try await order.waitTurn(k)
                    let next = TurnHandOver(sequencer: order, seq: k)
                    try await self.write(w, issued: last ? issued : next.pass)
                    next.pass()
                }
            }
            try await group.waitForAll()
        }
    }

    private func write(_ w: PendingWrite, issued: @escaping @Sendable () -> Void) async throws {
        switch w.kind {
        case .data(let pointer, let count):
            try await write(at: w.offset, from: UnsafeRawBufferPointer(start: pointer, count: count), flags: [], issued: issued)
        case .zero(let length, let flags):
            try await writeZeroes(at: w.offset, length: length, flags: flags, issued: issued)
        }
    }
}
