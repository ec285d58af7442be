import CLibNBD
import FerryCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One NBD command's worth of work: what a connection's event loop issues to libnbd.
enum NBDOperation {
    case read(UnsafeMutableRawPointer, Int)
    case write(UnsafeRawPointer, Int, flags: UInt32)
    case zero(length: Int64, flags: UInt32)
    case trim(length: Int64)
    case flush
    case blockStatus(length: Int64, into: ExtentCollector)

    /// What the command is called in error messages.
    var verb: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .zero: "write zeroes"
        case .trim: "trim"
        case .flush: "flush"
        case .blockStatus: "block status"
        }
    }
}

/// One NBD command in flight (or queued): the operation, where, and the call it belongs to.
/// Buffers in `operation` belong to the caller, whose task stays suspended until `call`
/// has heard from every piece, so they outlive the command.
final class Piece: @unchecked Sendable {
    let operation: NBDOperation
    let offset: Int64
    let call: PendingCall
    /// Set by the loop when the command is issued; the loop thread alone touches it.
    unowned(unsafe) var connection: NBDConnection?

    init(_ operation: NBDOperation, at offset: Int64, call: PendingCall) {
        self.operation = operation
        self.offset = offset
        self.call = call
    }
}

/// Where a block-status command's answer lands (filled on the loop thread, read by the caller
/// after its call has resumed, which the call's lock orders).
final class ExtentCollector: @unchecked Sendable {
    static let context = "base:allocation"
    let start: Int64
    var extents: [Extent] = []

    init(start: Int64) { self.start = start }

    func add(context: UnsafePointer<CChar>?, offset: UInt64, entries: UnsafeMutablePointer<UInt32>?, count: Int) {
        guard let context, String(cString: context) == Self.context, let entries, extents.isEmpty else { return }
        var at = Int64(bitPattern: offset)
        var i = 0
        while i + 1 < count {
            let length = Int64(entries[i])
            let flags = entries[i + 1]
            i += 2
            guard length > 0 else { break }
            // Reads as zeros whether or not it is allocated; a hole without the zero bit may
            // read as anything, so it is data.
            let kind: ExtentKind = flags & UInt32(LIBNBD_STATE_ZERO) != 0 ? .zero : .data
            extents.append(Extent(offset: at, length: length, kind: kind))
            at += length
        }
    }
}

/// What the server told us during the handshake (read on the loop thread, which owns the handle).
struct ServerInfo: Sendable {
    var size: Int64
    var readOnly: Bool
    var canZero: Bool
    var canFastZero: Bool
    var canTrim: Bool
    var canFlush: Bool
    var canFUA: Bool
    var canMultiConn: Bool
    var canExtents: Bool
    var minimumBlock: Int64
    var preferredBlock: Int64
    var maximumBlock: Int64
}

/// One NBD connection: a libnbd handle owned by one event-loop thread.
///
/// Callers queue pieces under a lock and wake the loop through an eventfd; the loop issues
/// them with libnbd's aio calls, polls the socket in the direction libnbd asks for and the
/// eventfd together, and tells libnbd when the socket is ready. libnbd runs the completion
/// callbacks inside `nbd_aio_notify_read`, on this thread; they finish the pieces, which
/// resume the waiting tasks. Nothing here runs on Swift's cooperative pool.
///
/// Stopping lets every piece in flight complete or fail first, then disconnects cleanly
/// (`nbd_shutdown`) and closes the handle: a server must never see a connection dropped with
/// requests outstanding (nbdkit 1.32 can crash on that).
final class NBDConnection: @unchecked Sendable {
    let index: Int
    /// The URL as the user wrote it, for messages.
    let name: String
    private let handle: OpaquePointer
    /// Where callers queue pieces for the loop thread.
    private let inbox: EventLoopQueue<Piece>
    /// Pieces queued or in flight here: how busy this connection is, for spreading requests.
    let load = Atomic<Int>(0)

    // Loop thread only.
    private var outstanding: [ObjectIdentifier: Piece] = [:]
    private var dead: FerryError?

    private init(index: Int, name: String, handle: OpaquePointer, inbox: EventLoopQueue<Piece>) {
        self.index = index
        self.name = name
        self.handle = handle
        self.inbox = inbox
    }

    /// Opens a connection to `uri` on a new event-loop thread; returns once the handshake is
    /// done, with what the server said.
    static func connect(uri: String, name: String, index: Int) async throws -> (NBDConnection, ServerInfo) {
        guard let h = nbd_create() else {
            throw FerryError(.other, "cannot create an NBD handle: \(String(cString: nbd_get_error()))", path: name)
        }
        _ = nbd_set_handle_name(h, "ferry-\(index)")
        // Reads never look at a failed buffer, so libnbd need not clear it first.
        _ = nbd_set_pread_initialize(h, false)
        guard nbd_add_meta_context(h, ExtentCollector.context) != -1 else {
            let e = FerryError(.other, "cannot ask for \(ExtentCollector.context): \(String(cString: nbd_get_error()))", path: name)
            nbd_close(h)
            throw e
        }
        let inbox: EventLoopQueue<Piece>
        do { inbox = try EventLoopQueue(name: name) } catch { nbd_close(h); throw error }
        let connection = NBDConnection(index: index, name: name, handle: h, inbox: inbox)
        let info: ServerInfo = try await withCheckedThrowingContinuation { continuation in
            let started = startDetachedThread(name: "ferry-nbd-\(index)") {
                connection.run(uri: uri) { continuation.resume(with: $0) }
            }
            if !started {
                nbd_close(h)
                continuation.resume(throwing: FerryError(.other, "cannot start an NBD event-loop thread", path: name))
            }
        }
        return (connection, info)
    }

    /// Queues a piece for this connection's loop. A stopped or dead connection fails it at once.
    func submit(_ piece: Piece) {
        load.add(1, ordering: .relaxed)
        if let failed = inbox.post(piece) {
            load.subtract(1, ordering: .relaxed)
            piece.call.pieceFinished(failed.at(offset: piece.offset))
        }
    }

    /// Lets the pieces in flight finish, disconnects, closes the handle, then returns.
    func stop() async {
        await inbox.stop()
    }

    // MARK: The loop thread

    /// libnbd's last error on this thread, as a FerryError.
    private func lastError(_ what: String, offset: Int64? = nil) -> FerryError {
        let message = nbd_get_error().map { String(cString: $0) } ?? "unknown error"
        let err = nbd_get_errno()
        return FerryError(err != 0 ? FerryError.Code(errno: err) : .io, "\(what): \(message)",
                          path: name, offset: offset, errno: err != 0 ? err : nil)
    }

    private func run(uri: String, connected: (Result<ServerInfo, any Error>) -> Void) {
        if nbd_connect_uri(handle, uri) == -1 {
            var e = lastError("cannot connect")
            if e.code == .invalidArgument || e.code == .notFound || e.code == .io {
                // Keep the code libnbd's errno gave; the message says what happened.
            } else if e.code == .other {
                e.code = .io
            }
            nbd_close(handle)
            finish(e)
            connected(.failure(e))
            return
        }
        connected(.success(serverInfo()))
        loop()
        if dead == nil {
            // Tell the server we are going (NBD_CMD_DISC) and wait for it to close its end.
            if nbd_shutdown(handle, 0) == -1 { _ = nbd_get_error() }
        }
        nbd_close(handle)
        finish(dead ?? FerryError(.other, "the connection is closed", path: name))
    }

    private func finish(_ error: FerryError) {
        for p in inbox.finish(error) {
            load.subtract(1, ordering: .relaxed)
            p.call.pieceFinished(error.at(offset: p.offset))
        }
    }

    private func serverInfo() -> ServerInfo {
        func flag(_ v: Int32) -> Bool { v == 1 }
        func block(_ kind: Int32) -> Int64 { max(0, nbd_get_block_size(handle, kind)) }
        return ServerInfo(
            size: nbd_get_size(handle),
            readOnly: flag(nbd_is_read_only(handle)),
            canZero: flag(nbd_can_zero(handle)),
            canFastZero: flag(nbd_can_fast_zero(handle)),
            canTrim: flag(nbd_can_trim(handle)),
            canFlush: flag(nbd_can_flush(handle)),
            canFUA: flag(nbd_can_fua(handle)),
            canMultiConn: flag(nbd_can_multi_conn(handle)),
            canExtents: flag(nbd_can_meta_context(handle, ExtentCollector.context)),
            minimumBlock: block(Int32(LIBNBD_SIZE_MINIMUM)),
            preferredBlock: block(Int32(LIBNBD_SIZE_PREFERRED)),
            maximumBlock: block(Int32(LIBNBD_SIZE_MAXIMUM)))
    }

    private func loop() {
        inbox.run(
            issue: { issue($0) },
            idle: { outstanding.isEmpty },
            socket: {
                guard dead == nil else { return nil }
                let direction = nbd_aio_get_direction(handle)
                var events: Int16 = 0
                if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
                if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
                return (nbd_aio_get_fd(handle), events)
            },
            service: { revents in
                var rc: Int32 = 0
                if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
                    rc = nbd_aio_notify_read(handle)
                }
                if rc != -1 && revents & Int16(POLLOUT) != 0
                    && nbd_aio_get_direction(handle) & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 {
                    rc = nbd_aio_notify_write(handle)
                }
                if rc == -1 || nbd_aio_is_dead(handle) == 1 {
                    connectionLost(lastError("the connection to the server was lost"))
                }
            },
            failed: { connectionLost($0) })
    }

    /// The socket is gone: every piece still in flight fails, and so does every later one.
    private func connectionLost(_ error: FerryError) {
        guard dead == nil else { return }
        var e = error
        if e.code == .other || e.code == .invalidArgument { e.code = .io }
        dead = e
        for p in Array(outstanding.values) { completed(p, error: e.at(offset: p.offset)) }
    }

    private func issue(_ p: Piece) {
        if let dead {
            load.subtract(1, ordering: .relaxed)
            p.call.pieceFinished(dead.at(offset: p.offset))
            return
        }
        p.connection = self
        outstanding[ObjectIdentifier(p)] = p
        let completion = nbd_completion_callback(
            callback: { data, error in
                let p = Unmanaged<Piece>.fromOpaque(data!).takeUnretainedValue()
                p.connection?.completed(p, errno: error?.pointee ?? 0)
                return 1
            },
            user_data: Unmanaged.passRetained(p).toOpaque(),
            free: { data in Unmanaged<Piece>.fromOpaque(data!).release() })
        let offset = UInt64(p.offset)
        let cookie: Int64
        switch p.operation {
        case .read(let buffer, let count):
            cookie = nbd_aio_pread(handle, buffer, count, offset, completion, 0)
        case .write(let buffer, let count, let flags):
            cookie = nbd_aio_pwrite(handle, buffer, count, offset, completion, flags)
        case .zero(let length, let flags):
            cookie = nbd_aio_zero(handle, UInt64(length), offset, completion, flags)
        case .trim(let length):
            cookie = nbd_aio_trim(handle, UInt64(length), offset, completion, 0)
        case .flush:
            cookie = nbd_aio_flush(handle, completion, 0)
        case .blockStatus(let length, let collector):
            let extents = nbd_extent_callback(
                callback: { data, context, offset, entries, count, _ in
                    Unmanaged<ExtentCollector>.fromOpaque(data!).takeUnretainedValue()
                        .add(context: context, offset: offset, entries: entries, count: count)
                    return 0
                },
                user_data: Unmanaged.passRetained(collector).toOpaque(),
                free: { data in Unmanaged<ExtentCollector>.fromOpaque(data!).release() })
            cookie = nbd_aio_block_status(handle, UInt64(length), offset, extents, completion, 0)
        }
        if cookie == -1 {
            let e = lastError("\(p.operation.verb) failed", offset: p.offset)
            if nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 {
                connectionLost(lastError("the connection to the server was lost"))
            }
            completed(p, error: e)
        }
    }

    /// A completion callback: the server answered (errno 0) or the command failed.
    fileprivate func completed(_ p: Piece, errno err: Int32) {
        guard err != 0 else {
            completed(p, error: nil)
            return
        }
        let e: FerryError
        if let dead {
            e = dead.at(offset: p.offset)
        } else if err == ENOTCONN || err == ESHUTDOWN || err == ECONNRESET || err == EPIPE {
            e = FerryError(.io, "the connection to the server was lost during \(p.operation.verb)",
                           path: name, offset: p.offset, errno: err)
        } else {
            e = FerryError.posix(err, "\(p.operation.verb) failed", path: name, offset: p.offset)
        }
        completed(p, error: e)
    }

    private func completed(_ p: Piece, error: FerryError?) {
        guard outstanding.removeValue(forKey: ObjectIdentifier(p)) != nil else { return }
        load.subtract(1, ordering: .relaxed)
        p.call.pieceFinished(error)
    }
}
