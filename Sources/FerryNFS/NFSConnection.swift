import CLibNFS
import FerryCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One NFS request's worth of work: what a connection's event loop issues to libnfs.
enum NFSOperation {
    case read(UnsafeMutableRawPointer, Int)
    case write(UnsafeRawPointer, Int)
    case fsync
    case truncate(Int64)

    var verb: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .fsync: "commit"
        case .truncate: "truncate"
        }
    }

    var count: Int {
        switch self {
        case .read(_, let n), .write(_, let n): n
        case .fsync, .truncate: 0
        }
    }
}

/// One piece of a caller's request (at most the server's maximum transfer). Buffers belong to
/// the caller, whose task stays suspended until `call` has heard from every piece.
final class NFSPiece: SessionPiece, @unchecked Sendable {
    let operation: NFSOperation
    let offset: Int64
    let call: PendingCall
    /// Bytes done so far (a server may answer a READ or WRITE with fewer bytes than asked;
    /// the rest is asked for again). Loop thread only.
    var done = 0
    /// Set by the loop when the piece is issued. Loop thread only.
    unowned(unsafe) var session: NFSConnection?

    /// Where the piece stands (the rest of a short READ or WRITE starts past `done`).
    var errorOffset: Int64? { offset + Int64(done) }

    init(_ operation: NFSOperation, at offset: Int64, call: PendingCall) {
        self.operation = operation
        self.offset = offset
        self.call = call
    }
}

/// How many NFS RPCs are in flight on a device's connections, and the most there ever were.
final class InFlightGauge: Sendable {
    private let current = Atomic<Int>(0)
    private let highest = HighWaterMark()
    private let largest = HighWaterMark()

    var peak: Int { highest.current }
    var largestTransfer: Int { largest.current }

    func enter(bytes: Int) {
        highest.note(current.wrappingAdd(1, ordering: .relaxed).newValue)
        largest.note(bytes)
    }

    func leave() { current.subtract(1, ordering: .relaxed) }
}

/// How a connection gets at the file once the export is mounted.
enum NFSOpenMode: Sendable {
    case readOnly
    case readWrite
    /// Create the file or truncate it, then give it this size (sparse, by SETATTR).
    case create(size: Int64)
}

/// What a connection learned while opening.
struct NFSFileInfo: Sendable {
    var size: Int64
    var readMax: Int
    var writeMax: Int
}

/// One NFS session: a libnfs context owned by one event-loop thread (`EventLoopSession`).
///
/// Everything that touches the context runs on that thread, from parsing the URL and mounting
/// the export (which connects and may resolve names) to the last close. The loop issues pieces
/// with libnfs's async calls, polls the context's socket in the directions `nfs_which_events`
/// asks for and calls `nfs_service`, inside which libnfs runs the completion callbacks.
///
/// Stopping closes the file handle (an NFSv4 CLOSE) once the pieces in flight have finished,
/// then destroys the context, which closes the socket.
typealias NFSConnection = EventLoopSession<NFSContext>

/// A libnfs context with its mount and open file: what NFS brings to its `EventLoopSession`
/// (loop thread only).
final class NFSContext: EventLoopLibrary {
    private let index: Int
    /// The URL as the user wrote it, for messages.
    private let name: String
    private let mode: NFSOpenMode
    private let gauge: InFlightGauge
    private var context: OpaquePointer?
    private var handle: OpaquePointer?
    private var usesV4 = false
    /// Seconds a setup call may wait for its answer (`Resilience.timeout`); 0: no limit.
    private var timeout: Double = 0

    private init(index: Int, url: String, mode: NFSOpenMode, gauge: InFlightGauge) {
        self.index = index
        self.name = url
        self.mode = mode
        self.gauge = gauge
    }

    /// Starts a connection's thread, which mounts the export and opens the file; returns once
    /// the file is open, with its size and the server's transfer limits.
    static func connect(url: String, mode: NFSOpenMode, index: Int, gauge: InFlightGauge,
                        resilience: Resilience = .standard) async throws -> (NFSConnection, NFSFileInfo) {
        try await NFSConnection.start(NFSContext(index: index, url: url, mode: mode, gauge: gauge), index: index, name: url,
                                      thread: "ferry-nfs", closed: "the NFS connection is closed", resilience: resilience)
    }

    private func libnfsError() -> String {
        libraryMessage(context.flatMap { nfs_get_error($0) })
    }

    func open(_ session: NFSConnection) throws -> NFSFileInfo {
        timeout = session.resilience.timeout
        return try open(url: name, mode: mode)
    }

    /// The file this session created is opened again as it is, never truncated.
    func reopen(_ session: NFSConnection) throws {
        if case .readOnly = mode { _ = try open(url: name, mode: .readOnly) } else { _ = try open(url: name, mode: .readWrite) }
    }

    /// Mounts, opens (or creates and sizes) the file and reads its size, each step an async
    /// call driven to its end on this thread.
    private func open(url: String, mode: NFSOpenMode) throws -> NFSFileInfo {
        guard let ctx = nfs_init_context() else {
            throw FerryError(.other, "cannot create an NFS context", path: name)
        }
        context = ctx
        // Fail rather than retry for ever when the server goes away (a URL may say otherwise
        // with autoreconnect=N).
        nfs_set_autoreconnect(ctx, 0)
        // NFSv4 tells clients apart by name and verifier: every session of this process needs
        // its own, or the server takes the second for the first one rebooted (CLID_INUSE).
        let tag = UInt32.random(in: 0 ... .max)
        nfs4_set_client_name(ctx, "ferry-\(getpid())-\(index)-\(String(tag, radix: 16))")
        // 16 hex digits: at least the 8 bytes libnfs takes.
        nfs4_set_verifier(ctx, String(UInt64.random(in: 1 << 60 ... .max), radix: 16))
        guard let parsed = nfs_parse_url_full(ctx, url) else {
            throw FerryError(.invalidArgument, "not a valid NFS URL (nfs://SERVER[:PORT]/EXPORT/FILE[?OPTIONS]): \(libnfsError())", path: name)
        }
        defer { nfs_destroy_url(parsed) }
        usesV4 = url.contains("version=4")
        let server = parsed.pointee.server.map { String(cString: $0) } ?? ""
        let export = parsed.pointee.path.map { String(cString: $0) } ?? ""
        let file = parsed.pointee.file.map { String(cString: $0) } ?? ""
        guard !server.isEmpty, export.count > 1, file.count > 1 else {
            throw FerryError(.invalidArgument, "not a valid NFS URL: it needs a server, an export and a file (nfs://SERVER[:PORT]/EXPORT/FILE[?OPTIONS])", path: name)
        }

        _ = try drive("cannot mount \(server):\(export)", .plain) { cb, data in
            nfs_mount_async(ctx, server, export, cb, data)
        }
        let opened: SetupResult
        switch mode {
        case .readOnly:
            opened = try drive("cannot open \(file)", .handle) { cb, data in
                nfs_open_async(ctx, file, O_RDONLY, cb, data)
            }
        case .readWrite:
            opened = try drive("cannot open \(file) for writing", .handle) { cb, data in
                nfs_open_async(ctx, file, O_RDWR, cb, data)
            }
        case .create:
            opened = try drive("cannot create \(file)", .handle) { cb, data in
                nfs_create_async(ctx, file, O_RDWR | O_TRUNC, 0o644, cb, data)
            }
        }
        guard let fh = opened.handle else {
            throw FerryError(.io, "the server opened \(file) without a file handle", path: name)
        }
        handle = fh
        if case .create(let size) = mode {
            _ = try drive("cannot set the size of \(file) to \(size) bytes", .plain) { cb, data in
                nfs_ftruncate_async(ctx, fh, UInt64(size), cb, data)
            }
        }
        let stat = try drive("cannot stat \(file)", .stat) { cb, data in
            nfs_fstat64_async(ctx, fh, cb, data)
        }
        if stat.isDirectory {
            throw FerryError(.isDirectory, "\(file) is a directory", path: name)
        }
        let readMax = Int(clamping: nfs_get_readmax(ctx))
        let writeMax = Int(clamping: nfs_get_writemax(ctx))
        return NFSFileInfo(size: stat.size,
                           readMax: readMax > 0 ? readMax : 1 << 20,
                           writeMax: writeMax > 0 ? writeMax : 1 << 20)
    }

    /// The answer of one setup call, filled by its callback.
    private final class SetupResult {
        enum Kind { case plain, handle, stat }
        let kind: Kind
        var finished = false
        var status: Int32 = 0
        var message: String?
        var handle: OpaquePointer?
        var size: Int64 = 0
        var isDirectory = false
        init(_ kind: Kind) { self.kind = kind }
    }

    private static let setupCallback: nfs_cb = { status, _, data, privateData in
        let r = Unmanaged<SetupResult>.fromOpaque(privateData!).takeRetainedValue()
        r.finished = true
        r.status = status
        if status < 0 {
            if let data { r.message = String(cString: data.assumingMemoryBound(to: CChar.self)) }
            return
        }
        switch r.kind {
        case .plain:
            break
        case .handle:
            r.handle = data.map { OpaquePointer($0) }
        case .stat:
            if let data {
                let st = data.assumingMemoryBound(to: nfs_stat_64.self).pointee
                r.size = Int64(bitPattern: st.nfs_size)
                r.isDirectory = (st.nfs_mode & UInt64(S_IFMT)) == UInt64(S_IFDIR)
            }
        }
    }

    /// Issues one async call and services the context until its callback has run.
    /// A server that does not answer within `limit` seconds (the timeout by default; 0: no
    /// limit) is an error.
    private func drive(_ what: String, _ kind: SetupResult.Kind, limit: Double? = nil,
                       _ issue: (nfs_cb, UnsafeMutableRawPointer) -> Int32) throws -> SetupResult {
        let limit = limit ?? timeout
        let deadline = limit > 0 ? monotonicNanoseconds() + UInt64(limit * 1e9) : .max
        guard let ctx = context else { throw FerryError(.other, "\(what): no NFS context", path: name) }
        let r = SetupResult(kind)
        let token = Unmanaged.passRetained(r).toOpaque()
        if issue(Self.setupCallback, token) != 0 {
            Unmanaged<SetupResult>.fromOpaque(token).release()
            throw failure(what, status: -EIO, message: libnfsError())
        }
        while !r.finished {
            let now = monotonicNanoseconds()
            guard now < deadline else {
                throw FerryError(.io, "\(what): the server did not answer in \(NFSConnection.seconds(limit)) (--timeout)", path: name, errno: ETIMEDOUT)
            }
            var fd = pollfd(fd: nfs_get_fd(ctx), events: Int16(truncatingIfNeeded: nfs_which_events(ctx)), revents: 0)
            let rc = poll(&fd, 1, deadline == .max ? -1 : Int32(min(1000, (deadline - now) / 1_000_000 + 1)))
            if rc < 0 {
                if errno == EINTR { continue }
                throw FerryError.posix(errno, "\(what): poll", path: name)
            }
            if nfs_service(ctx, Int32(fd.revents)) < 0 && !r.finished {
                throw failure(what, status: -ECONNRESET, message: libnfsError())
            }
        }
        if r.status < 0 {
            throw failure(what, status: r.status, message: r.message ?? libnfsError())
        }
        return r
    }

    /// A setup step's error: the code from libnfs's -errno, libnfs's words for the rest.
    private func failure(_ what: String, status: Int32, message: String) -> FerryError {
        let err = -status
        var code = FerryError.Code(errno: err)
        let lower = message.lowercased()
        if lower.contains("noent") || lower.contains("no such") { code = .notFound }
        else if lower.contains("acces") || lower.contains("perm") { code = .permissionDenied }
        else if lower.contains("rofs") || lower.contains("read-only") { code = .readOnly }
        else if code == .invalidArgument || code == .other { code = .io }
        var text = "\(what): \(message)"
        if code == .readOnly { text += " (the export is read-only)" }
        if lower.contains("pollhup") || lower.contains("connect") || lower.contains("refused") {
            code = .io
            text = "\(what): cannot reach the NFS server (\(message)); is it running, and on the port the URL names?"
        }
        return FerryError(code, text, path: name, errno: err > 0 ? err : nil)
    }

    func close(alive: Bool) {
        guard let ctx = context else { return }
        if let fh = handle, alive {
            // NFSv3 close is local; NFSv4 sends CLOSE. A failure here changes nothing.
            _ = try? drive("close", .plain, limit: Resilience.closeLimit(timeout)) { cb, data in nfs_close_async(ctx, fh, cb, data) }
        }
        handle = nil
        // Closes the socket; libnfs cancels whatever is still queued (their callbacks find
        // their pieces already finished and only drop their references).
        nfs_destroy_context(ctx)
        context = nil
    }

    func pollFor() -> (fd: Int32, events: Int16) {
        guard let ctx = context else { return (-1, 0) }
        return (nfs_get_fd(ctx), Int16(truncatingIfNeeded: nfs_which_events(ctx)))
    }

    func service(_ revents: Int16, _ session: NFSConnection) -> FerryError? {
        guard let ctx = context, nfs_service(ctx, Int32(revents)) >= 0 else {
            return FerryError(.io, "the connection to the NFS server was lost: \(libnfsError())", path: name, errno: ENOTCONN)
        }
        return nil
    }

    private static let pieceCallback: nfs_cb = { status, _, data, privateData in
        let p = Unmanaged<NFSPiece>.fromOpaque(privateData!).takeRetainedValue()
        if let s = p.session { s.library.answered(p, status: status, data: data, in: s) }
    }

    func issue(_ p: NFSPiece, _ session: NFSConnection) {
        p.session = session
        send(p, in: session)
    }

    /// Sends (the rest of) a piece as one RPC.
    private func send(_ p: NFSPiece, in session: NFSConnection) {
        guard let ctx = context, let fh = handle else { return }
        let token = Unmanaged.passRetained(p).toOpaque()
        let at = UInt64(p.offset) + UInt64(p.done)
        let rest = p.operation.count - p.done
        gauge.enter(bytes: rest)
        let rc: Int32
        switch p.operation {
        case .read:
            rc = nfs_pread_async(ctx, fh, at, UInt64(rest), Self.pieceCallback, token)
        case .write(let buffer, _):
            rc = nfs_pwrite_async(ctx, fh, at, UInt64(rest), buffer + p.done, Self.pieceCallback, token)
        case .fsync:
            rc = nfs_fsync_async(ctx, fh, Self.pieceCallback, token)
        case .truncate(let length):
            rc = nfs_ftruncate_async(ctx, fh, UInt64(length), Self.pieceCallback, token)
        }
        if rc != 0 {
            gauge.leave()
            Unmanaged<NFSPiece>.fromOpaque(token).release()
            session.complete(p, error: pieceError(p, status: -EIO, message: libnfsError(), at: Int64(at), sending: true))
        }
    }

    /// A completion callback (inside `nfs_service` or `nfs_destroy_context`, on this thread).
    private func answered(_ p: NFSPiece, status: Int32, data: UnsafeMutableRawPointer?, in session: NFSConnection) {
        gauge.leave()
        // Already failed (the session died): the caller may be gone, and its buffer with it.
        guard session.isOutstanding(p) else { return }
        let at = p.offset + Int64(p.done)
        if status < 0 {
            let message = data.map { String(cString: $0.assumingMemoryBound(to: CChar.self)) } ?? libnfsError()
            session.complete(p, error: pieceError(p, status: status, message: message, at: at))
            return
        }
        let rest = p.operation.count - p.done
        switch p.operation {
        case .fsync, .truncate:
            session.complete(p, error: nil)
        case .read(let buffer, _):
            let n = min(Int(status), rest)
            if n > 0, let data { (buffer + p.done).copyMemory(from: data, byteCount: n) }
            if n == 0 {
                session.complete(p, error: FerryError(.shortRead, "the NFS file ended at offset \(at) (it shrank under the copy?)",
                                              path: name, offset: at))
                return
            }
            p.done += n
            if p.done < p.operation.count { send(p, in: session) } else { session.complete(p, error: nil) }
        case .write:
            let n = min(Int(status), rest)
            if n == 0 {
                session.complete(p, error: FerryError(.io, "the NFS server wrote nothing", path: name, offset: at))
                return
            }
            p.done += n
            if p.done < p.operation.count { send(p, in: session) } else { session.complete(p, error: nil) }
        }
    }

    private func pieceError(_ p: NFSPiece, status: Int32, message: String, at: Int64, sending: Bool = false) -> FerryError {
        let err = -status
        var code = FerryError.Code(errno: err)
        let lower = message.lowercased()
        if lower.contains("rofs") || lower.contains("read-only") { code = .readOnly }
        else if lower.contains("nospc") { code = .noSpace }
        else if lower.contains("acces") || lower.contains("perm") { code = .permissionDenied }
        else if code == .invalidArgument || code == .other { code = .io }
        var text = sending ? "\(p.operation.verb) could not be sent: \(message)" : "\(p.operation.verb) failed: \(message)"
        var errno: Int32? = err > 0 ? err : nil
        if lower.contains("reconnect") || lower.contains("pollhup") || lower.contains("socket") || lower.contains("disconnect") {
            code = .io
            text = "the connection to the NFS server was lost during \(p.operation.verb): \(message)"
            // A reconnect takes it back.
            errno = ENOTCONN
        }
        if usesV4, case .write = p.operation, lower.contains("zdr") || lower.contains("encode") {
            text += " (libnfs 4.0 cannot send NFSv4 writes of 4 KiB or more: write over NFSv3)"
        }
        return FerryError(code, text, path: name, offset: at, errno: errno)
    }
}
