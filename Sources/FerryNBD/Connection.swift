import CLibNBD
import FerryCore

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
final class Piece: SessionPiece, @unchecked Sendable {
    let operation: NBDOperation
    let offset: Int64
    let call: PendingCall
    /// Set by the loop when the command is issued; the loop thread alone touches it.
    unowned(unsafe) var session: NBDConnection?

    var errorOffset: Int64? { offset }

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
    /// What the server can do, as the capabilities they give: write zeroes, fast zero, trim
    /// (`.discard`), block status (`.extents`), flush, FUA, multi-conn.
    var offers: BlockCapabilities
    /// The server's block sizes (0: not given).
    var blocks: (minimum: Int64, preferred: Int64, maximum: Int64)
}

/// One NBD connection: a libnbd handle owned by one event-loop thread (`EventLoopSession`).
///
/// The loop issues pieces with libnbd's aio calls, polls the socket in the direction libnbd
/// asks for, and tells libnbd when it is ready; libnbd runs the completion callbacks inside
/// `nbd_aio_notify_read`, on the loop thread.
///
/// Stopping disconnects cleanly (`nbd_aio_disconnect`) once the pieces in flight have finished: a
/// server must never see a connection dropped with requests outstanding (nbdkit 1.32 can
/// crash on that).
typealias NBDConnection = EventLoopSession<NBDHandle>

/// A libnbd handle: what NBD brings to its `EventLoopSession` (loop thread only).
final class NBDHandle: EventLoopLibrary {
    /// The libnbd handle: made by `open`, freed by `close` (a reconnect makes a new one).
    private var handle: OpaquePointer!
    private let uri: String
    private let name: String
    private let index: Int
    private var connected = false
    /// Seconds the handshake and a clean disconnect may take (`Resilience.timeout`, at most
    /// `Resilience.closeLimit` for the disconnect); 0: no limit.
    private var timeout: Double = 0

    private init(uri: String, name: String, index: Int) {
        self.uri = uri
        self.name = name
        self.index = index
    }

    /// Opens a connection to `uri` on a new event-loop thread; returns once the handshake is
    /// done, with what the server said.
    static func connect(uri: String, name: String, index: Int, resilience: Resilience = .standard) async throws -> (NBDConnection, ServerInfo) {
        try await NBDConnection.start(NBDHandle(uri: uri, name: name, index: index), index: index, name: name,
                                      thread: "ferry-nbd", closed: "the connection is closed", resilience: resilience)
    }

    private func makeHandle() throws -> OpaquePointer {
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
        return h
    }

    /// libnbd's last error on this thread, as a FerryError.
    private func lastError(_ what: String, offset: Int64? = nil) -> FerryError {
        let message = libraryMessage(nbd_get_error())
        let err = nbd_get_errno()
        return FerryError(err != 0 ? FerryError.Code(errno: err) : .io, "\(what): \(message)",
                          path: name, offset: offset, errno: err != 0 ? err : nil)
    }

    /// A lost connection fails with an I/O error (and ENOTCONN, which a reconnect takes
    /// back) whatever errno libnbd kept.
    private func lost() -> FerryError {
        var e = lastError("the connection to the server was lost")
        e.code = .io
        if !e.isConnectionLoss { e.errno = ENOTCONN }
        return e
    }

    func open(_ session: NBDConnection) throws -> ServerInfo {
        timeout = session.resilience.timeout
        if handle == nil { handle = try makeHandle() }
        // The handshake driven here, so that a server that accepts and then says nothing
        // (stopped) is not waited for beyond the timeout.
        var failed = nbd_aio_connect_uri(handle, uri) == -1
        if !failed {
            failed = !drive(until: timeout) { nbd_aio_is_connecting(handle) != 1 } || nbd_aio_is_ready(handle) != 1
            if nbd_aio_is_connecting(handle) == 1 {
                throw FerryError(.io, "cannot connect: the server did not finish the handshake in \(EventLoopSession<NBDHandle>.seconds(timeout)) (--timeout)",
                                 path: name, errno: ETIMEDOUT)
            }
        }
        if failed {
            var e = lastError("cannot connect")
            // Keep the code libnbd's errno gave; the message says what happened.
            if e.code == .other { e.code = .io }
            throw e
        }
        connected = true
        var offers: BlockCapabilities = []
        let flags: [(Int32, BlockCapabilities)] = [
            (nbd_can_zero(handle), .zero), (nbd_can_fast_zero(handle), .fastZero), (nbd_can_trim(handle), .discard),
            (nbd_can_flush(handle), .flush), (nbd_can_fua(handle), .fua), (nbd_can_multi_conn(handle), .multiConn),
            (nbd_can_meta_context(handle, ExtentCollector.context), .extents),
        ]
        for (answer, capability) in flags where answer == 1 { offers.insert(capability) }
        func block(_ kind: Int32) -> Int64 { max(0, nbd_get_block_size(handle, kind)) }
        return ServerInfo(size: nbd_get_size(handle), readOnly: nbd_is_read_only(handle) == 1, offers: offers,
                          blocks: (block(Int32(LIBNBD_SIZE_MINIMUM)), block(Int32(LIBNBD_SIZE_PREFERRED)),
                                   block(Int32(LIBNBD_SIZE_MAXIMUM))))
    }

    /// Polls and services the handle until `done`, for at most `limit` seconds (0: no
    /// limit). False if the time ran out or the connection failed first.
    private func drive(until limit: Double, _ done: () -> Bool) -> Bool {
        let deadline = limit > 0 ? monotonicNanoseconds() + UInt64(limit * 1e9) : .max
        while !done() {
            if nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1 { return done() }
            let now = monotonicNanoseconds()
            guard now < deadline else { return false }
            let (fd, events) = pollFor()
            var p = pollfd(fd: fd, events: events, revents: 0)
            let wait = deadline == .max ? 1000 : Int32(min(1000, (deadline - now) / 1_000_000 + 1))
            if poll(&p, 1, wait) < 0 && errno != EINTR { return false }
            var rc: Int32 = 0
            if p.revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 { rc = nbd_aio_notify_read(handle) }
            if rc != -1 && p.revents & Int16(POLLOUT) != 0 { rc = nbd_aio_notify_write(handle) }
            if rc == -1 { return done() }
        }
        return true
    }

    func close(alive: Bool) {
        guard let h = handle else { return }
        if alive && connected {
            // Tell the server we are going (NBD_CMD_DISC), nothing being in flight, and close
            // once the command is out, a bounded time: the server closes its end without a
            // reply, and waiting for that (3-6 ms from nbdkit, tearing down a connection's
            // threads) only delayed the end of every copy. A server that stopped reading is
            // not waited for.
            if nbd_aio_disconnect(h, 0) == -1 {
                _ = nbd_get_error()
            } else {
                _ = drive(until: Resilience.closeLimit(timeout)) {
                    nbd_aio_is_closed(h) == 1 || nbd_aio_is_dead(h) == 1
                        || nbd_aio_get_direction(h) & UInt32(LIBNBD_AIO_DIRECTION_WRITE) == 0
                }
            }
        }
        nbd_close(h)
        handle = nil
        connected = false
    }

    func pollFor() -> (fd: Int32, events: Int16) {
        let direction = nbd_aio_get_direction(handle)
        var events: Int16 = 0
        if direction & UInt32(LIBNBD_AIO_DIRECTION_READ) != 0 { events |= Int16(POLLIN) }
        if direction & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 { events |= Int16(POLLOUT) }
        return (nbd_aio_get_fd(handle), events)
    }

    func service(_ revents: Int16, _ session: NBDConnection) -> FerryError? {
        var rc: Int32 = 0
        if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 {
            rc = nbd_aio_notify_read(handle)
        }
        if rc != -1 && revents & Int16(POLLOUT) != 0
            && nbd_aio_get_direction(handle) & UInt32(LIBNBD_AIO_DIRECTION_WRITE) != 0 {
            rc = nbd_aio_notify_write(handle)
        }
        return rc == -1 || nbd_aio_is_dead(handle) == 1 ? lost() : nil
    }

    func issue(_ p: Piece, _ session: NBDConnection) {
        p.session = session
        let completion = nbd_completion_callback(
            callback: { data, error in
                let p = Unmanaged<Piece>.fromOpaque(data!).takeUnretainedValue()
                if let s = p.session { s.library.completed(p, errno: error?.pointee ?? 0, in: s) }
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
            // On a dead connection the piece waits for the reconnect (or fails with the loss).
            let gone = nbd_aio_is_dead(handle) == 1 || nbd_aio_is_closed(handle) == 1
            session.complete(p, error: gone ? lost().at(offset: p.offset) : e)
        }
    }

    /// A completion callback: the server answered (errno 0) or the command failed.
    private func completed(_ p: Piece, errno err: Int32, in session: NBDConnection) {
        var e: FerryError?
        if err == 0 {
            e = nil
        } else if let dead = session.dead {
            e = dead.at(offset: p.offset)
        } else if err == ENOTCONN || err == ESHUTDOWN || err == ECONNRESET || err == EPIPE {
            e = FerryError(.io, "the connection to the server was lost during \(p.operation.verb)",
                           path: name, offset: p.offset, errno: err)
        } else {
            e = FerryError.posix(err, "\(p.operation.verb) failed", path: name, offset: p.offset)
        }
        session.complete(p, error: e)
    }
}
