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
final class NFSPiece: @unchecked Sendable {
    let operation: NFSOperation
    let offset: Int64
    let call: PendingCall
    /// Bytes done so far (a server may answer a READ or WRITE with fewer bytes than asked;
    /// the rest is asked for again). Loop thread only.
    var done = 0
    /// Set by the loop when the piece is issued. Loop thread only.
    unowned(unsafe) var connection: NFSConnection?

    init(_ operation: NFSOperation, at offset: Int64, call: PendingCall) {
        self.operation = operation
        self.offset = offset
        self.call = call
    }
}

/// How many NFS RPCs are in flight on a device's connections, and the most there ever were.
final class InFlightGauge: Sendable {
    private let current = Atomic<Int>(0)
    private let highest = Atomic<Int>(0)
    private let largest = Atomic<Int>(0)

    var peak: Int { highest.load(ordering: .relaxed) }
    var largestTransfer: Int { largest.load(ordering: .relaxed) }

    func enter(bytes: Int) {
        let now = current.wrappingAdd(1, ordering: .relaxed).newValue
        raise(highest, to: now)
        raise(largest, to: bytes)
    }

    func leave() { current.subtract(1, ordering: .relaxed) }

    private func raise(_ a: borrowing Atomic<Int>, to n: Int) {
        var seen = a.load(ordering: .relaxed)
        while n > seen {
            let (exchanged, now) = a.compareExchange(expected: seen, desired: n, ordering: .relaxed)
            if exchanged { break }
            seen = now
        }
    }
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

/// One NFS session: a libnfs context owned by one event-loop thread.
///
/// Everything that touches the context runs on that thread, from parsing the URL and mounting
/// the export (which connects and may resolve names) to the last close: nothing blocks Swift's
/// cooperative pool. Callers queue pieces under a lock and wake the loop through a pipe; the
/// loop issues them with libnfs's async calls, polls the context's socket (in the directions
/// `nfs_which_events` asks for) and the pipe together, and calls `nfs_service`, inside which
/// libnfs runs the completion callbacks on this thread; they finish the pieces, which resume
/// the waiting tasks.
///
/// Stopping lets every piece in flight complete or fail first, closes the file handle (an
/// NFSv4 CLOSE), then destroys the context, which closes the socket.
final class NFSConnection: @unchecked Sendable {
    let index: Int
    /// The URL as the user wrote it, for messages.
    let name: String
    private let inbox: EventLoopQueue<NFSPiece>
    private let gauge: InFlightGauge
    /// Pieces queued or in flight here: how busy this connection is, for spreading requests.
    let load = Atomic<Int>(0)

    // Loop thread only.
    private var context: OpaquePointer?
    private var handle: OpaquePointer?
    private var dead: FerryError?
    private var usesV4 = false

    private init(index: Int, name: String, gauge: InFlightGauge, inbox: EventLoopQueue<NFSPiece>) {
        self.index = index
        self.name = name
        self.gauge = gauge
        self.inbox = inbox
    }

    /// Starts a connection's thread, which mounts the export and opens the file; returns once
    /// the file is open, with its size and the server's transfer limits.
    static func connect(url: String, mode: NFSOpenMode, index: Int, gauge: InFlightGauge) async throws -> (NFSConnection, NFSFileInfo) {
        let connection = NFSConnection(index: index, name: url, gauge: gauge, inbox: try EventLoopQueue(name: url))
        let info: NFSFileInfo = try await withCheckedThrowingContinuation { continuation in
            let started = startDetachedThread(name: "ferry-nfs-\(index)") {
                connection.run(url: url, mode: mode) { continuation.resume(with: $0) }
            }
            if !started {
                connection.finish(FerryError(.other, "cannot start an NFS event-loop thread", path: url))
                continuation.resume(throwing: FerryError(.other, "cannot start an NFS event-loop thread", path: url))
            }
        }
        return (connection, info)
    }

    /// Queues a piece. A stopped or dead connection fails it at once.
    func submit(_ piece: NFSPiece) {
        load.add(1, ordering: .relaxed)
        if let failed = inbox.post(piece) {
            load.subtract(1, ordering: .relaxed)
            piece.call.pieceFinished(failed.at(offset: piece.offset))
        }
    }

    /// Lets the pieces in flight finish, closes the file and the session, then returns.
    func stop() async {
        await inbox.stop()
    }

    // MARK: The loop thread

    private func libnfsError() -> String {
        guard let context, let p = nfs_get_error(context) else { return "unknown error" }
        let s = String(cString: p)
        return s.isEmpty ? "unknown error" : s
    }

    private func run(url: String, mode: NFSOpenMode, opened: (Result<NFSFileInfo, any Error>) -> Void) {
        let info: NFSFileInfo
        do {
            info = try open(url: url, mode: mode)
        } catch {
            let e = (error as? FerryError) ?? FerryError(.io, "\(error)", path: name)
            teardown()
            finish(e)
            opened(.failure(e))
            return
        }
        opened(.success(info))
        loop()
        teardown()
        finish(dead ?? FerryError(.other, "the NFS connection is closed", path: name))
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
    private func drive(_ what: String, _ kind: SetupResult.Kind,
                       _ issue: (nfs_cb, UnsafeMutableRawPointer) -> Int32) throws -> SetupResult {
        guard let ctx = context else { throw FerryError(.other, "\(what): no NFS context", path: name) }
        let r = SetupResult(kind)
        let token = Unmanaged.passRetained(r).toOpaque()
        if issue(Self.setupCallback, token) != 0 {
            Unmanaged<SetupResult>.fromOpaque(token).release()
            throw failure(what, status: -EIO, message: libnfsError())
        }
        while !r.finished {
            var fd = pollfd(fd: nfs_get_fd(ctx), events: Int16(truncatingIfNeeded: nfs_which_events(ctx)), revents: 0)
            let rc = poll(&fd, 1, -1)
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

    private func teardown() {
        guard let ctx = context else { return }
        if let fh = handle, dead == nil {
            // NFSv3 close is local; NFSv4 sends CLOSE. A failure here changes nothing.
            _ = try? drive("close", .plain) { cb, data in nfs_close_async(ctx, fh, cb, data) }
        }
        handle = nil
        // Closes the socket; libnfs cancels whatever is still queued (their callbacks find
        // their pieces already finished and only drop their references).
        nfs_destroy_context(ctx)
        context = nil
    }

    fileprivate func finish(_ error: FerryError) {
        for p in inbox.finish(error) {
            load.subtract(1, ordering: .relaxed)
            p.call.pieceFinished(error.at(offset: p.offset))
        }
    }

    private func loop() {
        guard let ctx = context else { return }
        inbox.run(
            issue: { issue($0) },
            idle: { pendingPieces.isEmpty },
            socket: { dead == nil ? (nfs_get_fd(ctx), Int16(truncatingIfNeeded: nfs_which_events(ctx))) : nil },
            service: { revents in
                if nfs_service(ctx, Int32(revents)) < 0 {
                    connectionLost(FerryError(.io, "the connection to the NFS server was lost: \(libnfsError())", path: name))
                }
            },
            failed: { connectionLost($0) })
    }

    /// The session is gone: every piece in flight fails, and so does every later one.
    private func connectionLost(_ error: FerryError) {
        guard dead == nil else { return }
        dead = error
        for p in pendingPieces.values { complete(p, error: error.at(offset: p.offset + Int64(p.done))) }
    }

    /// Pieces issued to libnfs and not yet finished, by identity (loop thread only).
    private var pendingPieces: [ObjectIdentifier: NFSPiece] = [:]

    private static let pieceCallback: nfs_cb = { status, _, data, privateData in
        let p = Unmanaged<NFSPiece>.fromOpaque(privateData!).takeRetainedValue()
        p.connection?.answered(p, status: status, data: data)
    }

    private func issue(_ p: NFSPiece) {
        if let dead {
            load.subtract(1, ordering: .relaxed)
            p.call.pieceFinished(dead.at(offset: p.offset))
            return
        }
        p.connection = self
        pendingPieces[ObjectIdentifier(p)] = p
        send(p)
    }

    /// Sends (the rest of) a piece as one RPC.
    private func send(_ p: NFSPiece) {
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
            complete(p, error: pieceError(p, status: -EIO, message: libnfsError(), at: Int64(at), sending: true))
        }
    }

    /// A completion callback (inside `nfs_service` or `nfs_destroy_context`, on this thread).
    fileprivate func answered(_ p: NFSPiece, status: Int32, data: UnsafeMutableRawPointer?) {
        gauge.leave()
        // Already failed (the session died): the caller may be gone, and its buffer with it.
        guard pendingPieces[ObjectIdentifier(p)] != nil else { return }
        let at = p.offset + Int64(p.done)
        if status < 0 {
            let message = data.map { String(cString: $0.assumingMemoryBound(to: CChar.self)) } ?? libnfsError()
            complete(p, error: pieceError(p, status: status, message: message, at: at))
            return
        }
        let rest = p.operation.count - p.done
        switch p.operation {
        case .fsync, .truncate:
            complete(p, error: nil)
        case .read(let buffer, _):
            let n = min(Int(status), rest)
            if n > 0, let data { (buffer + p.done).copyMemory(from: data, byteCount: n) }
            if n == 0 {
                complete(p, error: FerryError(.shortRead, "the NFS file ended at offset \(at) (it shrank under the copy?)",
                                              path: name, offset: at))
                return
            }
            p.done += n
            if p.done < p.operation.count { send(p) } else { complete(p, error: nil) }
        case .write:
            let n = min(Int(status), rest)
            if n == 0 {
                complete(p, error: FerryError(.io, "the NFS server wrote nothing", path: name, offset: at))
                return
            }
            p.done += n
            if p.done < p.operation.count { send(p) } else { complete(p, error: nil) }
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
        if lower.contains("reconnect") || lower.contains("pollhup") || lower.contains("socket") || lower.contains("disconnect") {
            code = .io
            text = "the connection to the NFS server was lost during \(p.operation.verb): \(message)"
        }
        if usesV4, case .write = p.operation, lower.contains("zdr") || lower.contains("encode") {
            text += " (libnfs 4.0 cannot send NFSv4 writes of 4 KiB or more: write over NFSv3)"
        }
        return FerryError(code, text, path: name, offset: at, errno: err > 0 ? err : nil)
    }

    private func complete(_ p: NFSPiece, error: FerryError?) {
        guard pendingPieces.removeValue(forKey: ObjectIdentifier(p)) != nil else { return }
        load.subtract(1, ordering: .relaxed)
        p.call.pieceFinished(error)
    }
}
