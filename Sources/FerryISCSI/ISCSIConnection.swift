import CFerryISCSI
import CFerryLinux
import CLibISCSI
import FerryCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One SCSI command's worth of work: what a session's event loop issues to libiscsi.
/// Addresses and counts are in logical blocks.
enum ISCSIOperation {
    /// READ(16) of `blocks` straight into the caller's buffer.
    case read(UnsafeMutableRawPointer, lba: UInt64, blocks: UInt32)
    /// WRITE(16) from the caller's buffer.
    case write(UnsafeRawPointer, lba: UInt64, blocks: UInt32, fua: Bool)
    /// WRITE SAME(16) of one block of zeros, with the UNMAP bit if `unmap`.
    case writeSame(lba: UInt64, blocks: UInt32, unmap: Bool)
    /// UNMAP of one range.
    case unmap(lba: UInt64, blocks: UInt32)
    /// SYNCHRONIZE CACHE(16) of the whole LUN.
    case sync
    /// GET LBA STATUS from `lba`; the answer goes to the piece's `status`.
    case lbaStatus(lba: UInt64)

    var verb: String {
        switch self {
        case .read: "READ(16)"
        case .write: "WRITE(16)"
        case .writeSame(_, _, let unmap): unmap ? "WRITE SAME(16) with UNMAP" : "WRITE SAME(16)"
        case .unmap: "UNMAP"
        case .sync: "SYNCHRONIZE CACHE(16)"
        case .lbaStatus: "GET LBA STATUS"
        }
    }

    var lba: UInt64 {
        switch self {
        case .read(_, let lba, _), .write(_, let lba, _, _), .writeSame(let lba, _, _), .unmap(let lba, _), .lbaStatus(let lba): lba
        case .sync: 0
        }
    }

    var bytesMoved: Int {
        switch self {
        case .read(_, _, let n), .write(_, _, let n, _): Int(n)
        default: 0
        }
    }
}

/// One descriptor of a GET LBA STATUS answer.
struct LBAStatus: Sendable {
    var lba: UInt64
    var blocks: UInt32
    /// 0 mapped, 1 deallocated, 2 anchored.
    var provisioning: UInt32
}

/// One piece of a caller's request. Buffers belong to the caller, whose task stays suspended
/// until `call` has heard from every piece.
final class ISCSIPiece: SessionPiece, @unchecked Sendable {
    let operation: ISCSIOperation
    let call: PendingCall
    /// The byte offset of the piece's first block (for messages).
    let offset: Int64
    /// GET LBA STATUS descriptors, filled on the loop thread before `call` hears of the piece.
    var status: [LBAStatus] = []
    /// The one-entry scatter list libiscsi reads into or writes from (lives as long as the task).
    var iov = scsi_iovec()
    var unmapRange = unmap_list()
    /// Set by the loop when the piece is issued. Loop thread only.
    unowned(unsafe) var session: ISCSIConnection?

    var errorOffset: Int64? { offset }

    init(_ operation: ISCSIOperation, blockSize: Int, call: PendingCall) {
        self.operation = operation
        self.offset = Int64(operation.lba) * Int64(blockSize)
        self.call = call
    }
}

/// What a session learned about the LUN while logging in.
struct ISCSILunInfo: Sendable {
    /// READ CAPACITY(16): the logical block size and the number of blocks.
    var blockSize = 512
    var blocks: UInt64 = 0
    var provisioning: Provisioning = []
    var limits = BlockLimitsPage()
    /// The quickest of the set-up commands' round trips, in nanoseconds.
    var roundTrip: UInt64 = .max

    /// The provisioning bits of READ CAPACITY(16) and the Logical Block Provisioning VPD.
    struct Provisioning: OptionSet, Sendable {
        let rawValue: UInt8
        /// LBPME: the LUN is thin-provisioned (GET LBA STATUS works).
        static let thin = Provisioning(rawValue: 1 << 0)
        /// LBPRZ: unmapped blocks read as zeros.
        static let readsZeroWhenUnmapped = Provisioning(rawValue: 1 << 1)
        /// LBPU: UNMAP is supported.
        static let unmap = Provisioning(rawValue: 1 << 2)
        /// LBPWS: WRITE SAME(16) with UNMAP is supported.
        static let writeSameUnmap = Provisioning(rawValue: 1 << 3)
    }

    /// The Block Limits VPD, in blocks (0: not reported).
    struct BlockLimitsPage: Sendable {
        var maxTransfer: UInt32 = 0
        var optimalTransfer: UInt32 = 0
        var maxUnmap: UInt32 = 0
        var maxWriteSame: UInt64 = 0
    }
}

/// SCSI status values (scsi_status in iscsi.h) as the callbacks get them.
enum SCSIStatus {
    static let good = Int32(bitPattern: SCSI_STATUS_GOOD.rawValue)
    static let checkCondition = Int32(bitPattern: SCSI_STATUS_CHECK_CONDITION.rawValue)
    static let cancelled = Int32(bitPattern: SCSI_STATUS_CANCELLED.rawValue)
    static let error = Int32(bitPattern: SCSI_STATUS_ERROR.rawValue)
    static let timeout = Int32(bitPattern: SCSI_STATUS_TIMEOUT.rawValue)
}

/// Words for a check condition: sense key and ASC/ASCQ with libiscsi's names for them.
func describeSense(_ task: UnsafeMutablePointer<scsi_task>) -> (text: String, key: Int) {
    let key = Int(task.pointee.sense.key.rawValue)
    let ascq = Int(task.pointee.sense.ascq)
    let keyName = scsi_sense_key_str(Int32(key)).map { String(cString: $0) } ?? "UNKNOWN"
    var text = "sense key \(keyName) (0x\(String(key, radix: 16)))"
    let asc = String(format2: ascq >> 8), q = String(format2: ascq & 0xff)
    text += ", ASC/ASCQ 0x\(asc)/0x\(q)"
    if let p = scsi_sense_ascq_str(Int32(ascq)) {
        let s = String(cString: p)
        if !s.isEmpty && !s.lowercased().hasPrefix("unknown") { text += " \(s)" }
    }
    return (text, key)
}

extension String {
    /// Two hex digits.
    init(format2 v: Int) {
        let s = String(v & 0xff, radix: 16)
        self = s.count == 1 ? "0" + s : s
    }
}

/// One iSCSI session: a libiscsi context owned by one event-loop thread (`EventLoopSession`).
///
/// Everything that touches the context runs on that thread, from parsing the URL and the
/// connect-and-login (`iscsi_full_connect_async`) to the last logout. The loop issues pieces
/// with libiscsi's async task calls, polls the session's socket in the directions
/// `iscsi_which_events` asks for and calls `iscsi_service` (also when poll times out: libiscsi
/// runs its timers from there), inside which libiscsi runs the completion callbacks.
///
/// Stopping logs out once the pieces in flight have finished.
typealias ISCSIConnection = EventLoopSession<ISCSIContext>

extension EventLoopSession where Library == ISCSIContext {
    /// TCP segments with data this session has sent, or nil if the kernel does not say.
    var dataSegmentsSent: Int? { library.dataSegmentsSent }
}

/// A libiscsi context logged in to one LUN: what iSCSI brings to its `EventLoopSession`
/// (loop thread only, but for `dataSegmentsSent`).
final class ISCSIContext: EventLoopLibrary {
    private let index: Int
    /// The URL without its password, for messages.
    private let name: String
    private let url: String
    /// The session's TCP socket once logged in, else -1.
    private let socket = Atomic<Int32>(-1)

    /// TCP segments with data this session has sent, or nil if the kernel does not say
    /// (any thread).
    var dataSegmentsSent: Int? {
        let fd = socket.load(ordering: .acquiring)
        guard fd >= 0 else { return nil }
        let n = ferry_tcp_data_segments_sent(fd)
        return n < 0 ? nil : Int(n)
    }

    private var context: OpaquePointer?
    private var lun: Int32 = 0
    private var blockSize: Int32 = 512
    private var loggedIn = false
    /// Seconds a setup command may wait for its answer (`Resilience.timeout`); 0: no limit.
    private var timeout: Double = 0
    /// What `pollFor` last asked for (no events: a shorter timeout).
    private var events: Int32 = 0
    /// One block of zeros for WRITE SAME.
    private var zeroBlock: UnsafeMutableRawPointer?

    private init(index: Int, name: String, url: String) {
        self.index = index
        self.name = name
        self.url = url
    }

    deinit {
        zeroBlock?.deallocate()
    }

    /// Starts a session's thread, which connects, logs in and probes the LUN; returns once
    /// the session is ready.
    static func connect(url: String, name: String, index: Int, resilience: Resilience = .standard) async throws -> (ISCSIConnection, ISCSILunInfo) {
        try await ISCSIConnection.start(ISCSIContext(index: index, name: name, url: url), index: index, name: name,
                                        thread: "ferry-iscsi", closed: "the iSCSI session is closed", resilience: resilience)
    }

    private func libiscsiError() -> String {
        libraryMessage(context.flatMap { iscsi_get_error($0) })
    }

    func open(_ session: ISCSIConnection) throws -> ISCSILunInfo {
        timeout = session.resilience.timeout
        let info = try open(url: url)
        if let ctx = context { socket.store(iscsi_get_fd(ctx), ordering: .releasing) }
        return info
    }

    /// The answer of one setup call, filled by its callback through `handler`.
    private final class SetupCall {
        var finished = false
        var status: Int32 = 0
        var sense: String?
        var senseKey = 0
        let handler: (UnsafeMutablePointer<scsi_task>) -> Void
        init(_ handler: @escaping (UnsafeMutablePointer<scsi_task>) -> Void) { self.handler = handler }
    }

    /// The connect callback: called once when the login ends, and again (with an error) if the
    /// established session fails later, which the loop notices through `iscsi_service` too.
    private static let connectCallback: iscsi_command_cb = { _, status, _, privateData in
        let c = Unmanaged<ISCSIContext>.fromOpaque(privateData!).takeUnretainedValue()
        if !c.connectFinished {
            c.connectFinished = true
            c.connectStatus = status
        }
    }
    private var connectFinished = false
    private var connectStatus: Int32 = 0

    private static let setupCallback: iscsi_command_cb = { _, status, commandData, privateData in
        let r = Unmanaged<SetupCall>.fromOpaque(privateData!).takeRetainedValue()
        r.finished = true
        r.status = status
        guard let commandData else { return }
        let task = commandData.assumingMemoryBound(to: scsi_task.self)
        if status == SCSIStatus.good {
            r.handler(task)
        } else if status == SCSIStatus.checkCondition {
            let s = describeSense(task)
            r.sense = s.text
            r.senseKey = s.key
        }
        scsi_free_scsi_task(task)
    }

    /// Services the context until `done()` says so; throws if the session fails first.
    /// A target that does not answer within `limit` seconds (the timeout by default; 0: no
    /// limit) is an error.
    private func serviceUntil(_ what: String, limit: Double? = nil, _ done: () -> Bool) throws {
        guard let ctx = context else { throw FerryError(.other, "\(what): no iSCSI context", path: name) }
        let limit = limit ?? timeout
        let deadline = limit > 0 ? monotonicNanoseconds() + UInt64(limit * 1e9) : .max
        while !done() {
            guard monotonicNanoseconds() < deadline else {
                throw FerryError(.io, "\(what): the target did not answer in \(ISCSIConnection.seconds(limit)) (--timeout)", path: name, errno: ETIMEDOUT)
            }
            let events = iscsi_which_events(ctx)
            var fd = pollfd(fd: iscsi_get_fd(ctx), events: Int16(truncatingIfNeeded: events), revents: 0)
            let rc = poll(&fd, 1, events == 0 ? 100 : 1000)
            if rc < 0 {
                if errno == EINTR { continue }
                throw FerryError.posix(errno, "\(what): poll", path: name)
            }
            if iscsi_service(ctx, Int32(fd.revents)) < 0 && !done() {
                throw FerryError(.io, "\(what): \(libiscsiError())", path: name)
            }
        }
    }

    /// The quickest set-up command so far, in nanoseconds.
    private var quickestRoundTrip: UInt64 = .max

    /// Issues one SCSI task during setup and services the context until its callback has run.
    /// Nil for a check condition when `optional` (a page the target does not have).
    @discardableResult
    private func setupCommand(_ what: String, optional: Bool = false,
                              _ handler: @escaping (UnsafeMutablePointer<scsi_task>) -> Void,
                              _ issue: (iscsi_command_cb, UnsafeMutableRawPointer) -> UnsafeMutablePointer<scsi_task>?) throws -> Bool {
        let r = SetupCall(handler)
        let token = Unmanaged.passRetained(r).toOpaque()
        let sent = monotonicNanoseconds()
        guard issue(Self.setupCallback, token) != nil else {
            Unmanaged<SetupCall>.fromOpaque(token).release()
            throw FerryError(.io, "\(what) could not be sent: \(libiscsiError())", path: name)
        }
        try serviceUntil(what) { r.finished }
        quickestRoundTrip = min(quickestRoundTrip, monotonicNanoseconds() - sent)
        if r.status == SCSIStatus.good { return true }
        if r.status == SCSIStatus.checkCondition && optional { return false }
        if let sense = r.sense {
            throw FerryError(r.senseKey == 0x07 ? .readOnly : .io, "\(what) failed: \(sense)", path: name)
        }
        throw FerryError(.io, "\(what) failed: \(libiscsiError())", path: name)
    }

    /// Parses the URL, connects and logs in, then asks the LUN for its size and limits.
    private func open(url: String) throws -> ISCSILunInfo {
        let initiator = "iqn.2026-01.dev.ferry:initiator-\(getpid())-\(index)"
        // A reopen starts from a new context: nothing of the last login counts.
        connectFinished = false
        connectStatus = 0
        loggedIn = false
        if let why = ferry_iscsi_load_error() {
            throw FerryError(.notSupported, String(cString: why), path: name)
        }
        guard let ctx = iscsi_create_context(initiator) else {
            throw FerryError(.other, "cannot create an iSCSI context", path: name)
        }
        context = ctx
        guard let parsed = iscsi_parse_full_url(ctx, url) else {
            throw FerryError(.invalidArgument,
                             "not a valid iSCSI URL (iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET-IQN/LUN): \(libiscsiError())",
                             path: name)
        }
        defer { iscsi_destroy_url(parsed) }
        let portal = withUnsafeBytes(of: parsed.pointee.portal) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let target = withUnsafeBytes(of: parsed.pointee.target) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let user = withUnsafeBytes(of: parsed.pointee.user) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let password = withUnsafeBytes(of: parsed.pointee.passwd) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        lun = parsed.pointee.lun
        iscsi_set_targetname(ctx, target)
        iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
        iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE_CRC32C)
        if !user.isEmpty { iscsi_set_initiator_username_pwd(ctx, user, password) }
        // Fail rather than reconnect for ever when the target goes away.
        iscsi_set_noautoreconnect(ctx, 1)
        iscsi_set_reconnect_max_retries(ctx, 0)

        let me = Unmanaged.passUnretained(self).toOpaque()
        if iscsi_full_connect_async(ctx, portal, lun, Self.connectCallback, me) != 0 {
            throw loginFailure(portal: portal, target: target, message: libiscsiError())
        }
        do {
            try serviceUntil("cannot log in to \(target) at \(portal)") { connectFinished }
        } catch let e as FerryError {
            throw loginFailure(portal: portal, target: target, message: e.message)
        }
        if connectStatus != SCSIStatus.good {
            throw loginFailure(portal: portal, target: target, message: libiscsiError())
        }
        loggedIn = true

        var info = ISCSILunInfo()
        var capacity: (UInt64, UInt32, Bool, Bool)?
        let lun = self.lun
        try setupCommand("READ CAPACITY(16) of LUN \(lun)", { task in
            if let p = scsi_datain_unmarshall(task) {
                let rc = p.assumingMemoryBound(to: scsi_readcapacity16.self).pointee
                capacity = (rc.returned_lba, rc.block_length, rc.lbpme != 0, rc.lbprz != 0)
            }
        }) { cb, data in iscsi_readcapacity16_task(ctx, lun, cb, data) }
        guard let (lastLBA, blockLength, lbpme, lbprz) = capacity, blockLength >= 512, blockLength & (blockLength - 1) == 0 else {
            throw FerryError(.io, "READ CAPACITY(16) of LUN \(lun) gave no usable answer", path: name)
        }
        info.blockSize = Int(blockLength)
        blockSize = Int32(blockLength)
        info.blocks = lastLBA &+ 1
        if lbpme { info.provisioning.insert(.thin) }
        if lbprz { info.provisioning.insert(.readsZeroWhenUnmapped) }

        try setupCommand("INQUIRY (Block Limits VPD) of LUN \(lun)", optional: true, { task in
            if let p = scsi_datain_unmarshall(task) {
                let bl = p.assumingMemoryBound(to: scsi_inquiry_block_limits.self).pointee
                info.limits = .init(maxTransfer: bl.max_xfer_len, optimalTransfer: bl.opt_xfer_len,
                                    maxUnmap: bl.max_unmap, maxWriteSame: bl.max_ws_len)
            }
        }) { cb, data in iscsi_inquiry_task(ctx, lun, 1, Int32(SCSI_INQUIRY_PAGECODE_BLOCK_LIMITS.rawValue), 255, cb, data) }

        if lbpme {
            try setupCommand("INQUIRY (Logical Block Provisioning VPD) of LUN \(lun)", optional: true, { task in
                if let p = scsi_datain_unmarshall(task) {
                    let lbp = p.assumingMemoryBound(to: scsi_inquiry_logical_block_provisioning.self).pointee
                    if lbp.lbpu != 0 { info.provisioning.insert(.unmap) }
                    if lbp.lbpws != 0 { info.provisioning.insert(.writeSameUnmap) }
                }
            }) { cb, data in iscsi_inquiry_task(ctx, lun, 1, Int32(SCSI_INQUIRY_PAGECODE_LOGICAL_BLOCK_PROVISIONING.rawValue), 255, cb, data) }
        }
        let z = UnsafeMutableRawPointer.allocate(byteCount: info.blockSize, alignment: 4096)
        z.initializeMemory(as: UInt8.self, repeating: 0, count: info.blockSize)
        // A reopen: the old context, and every task that used the old block, is gone.
        zeroBlock?.deallocate()
        zeroBlock = z
        info.roundTrip = quickestRoundTrip
        return info
    }

    /// A failed connect or login, in the user's terms.
    private func loginFailure(portal: String, target: String, message: String) -> FerryError {
        let lower = message.lowercased()
        if lower.contains("authentication") || lower.contains("authoriz") || lower.contains("chap") {
            return FerryError(.permissionDenied, "login to \(target) refused: \(message) (wrong user or password?)", path: name)
        }
        if lower.contains("not found") || lower.contains("target_not_found") || lower.contains("removed") {
            return FerryError(.notFound, "no target \(target) at \(portal): \(message)", path: name)
        }
        if lower.contains("logical_unit_not_supported") || lower.contains("testunitready") || lower.contains("lun") {
            return FerryError(.notFound, "target \(target) has no usable LUN \(lun): \(message)", path: name)
        }
        if lower.contains("reconnect") {
            return FerryError(.io, "cannot reach the iSCSI portal \(portal): the connection was refused or dropped; is the target running, and on the port the URL names?", path: name)
        }
        if lower.contains("connect") || lower.contains("refused") || lower.contains("pollhup") || lower.contains("socket") {
            return FerryError(.io, "cannot reach the iSCSI portal \(portal) (\(message)); is the target running, and on the port the URL names?", path: name)
        }
        return FerryError(.io, "cannot log in to \(target) at \(portal): \(message)", path: name)
    }

    func close(alive: Bool) {
        guard let ctx = context else { return }
        if loggedIn && alive {
            // A clean logout; a failure here changes nothing.
            final class Flag { var done = false }
            let flag = Flag()
            let token = Unmanaged.passRetained(flag).toOpaque()
            let cb: iscsi_command_cb = { _, _, _, p in
                Unmanaged<Flag>.fromOpaque(p!).takeRetainedValue().done = true
            }
            if iscsi_logout_async(ctx, cb, token) == 0 {
                try? serviceUntil("logout", limit: Resilience.closeLimit(timeout)) { flag.done }
            } else {
                Unmanaged<Flag>.fromOpaque(token).release()
            }
        }
        socket.store(-1, ordering: .releasing)
        // Closes the socket; libiscsi cancels whatever is still queued (their callbacks find
        // their pieces already finished and only drop their references).
        iscsi_destroy_context(ctx)
        context = nil
    }

    func pollFor() -> (fd: Int32, events: Int16) {
        guard let ctx = context else { return (-1, 0) }
        events = iscsi_which_events(ctx)
        return (iscsi_get_fd(ctx), Int16(truncatingIfNeeded: events))
    }

    // libiscsi runs its timers and reconnects from iscsi_service: call it now and then even
    // when the socket is quiet.
    func pollTimeout() -> Int32 { events == 0 ? 100 : 1000 }
    static var serviceWithoutEvents: Bool { true }

    func service(_ revents: Int16, _ session: ISCSIConnection) -> FerryError? {
        guard let ctx = context else { return nil }
        // tgtd takes Data-Out PDUs of 8 KiB (its MaxRecvDataSegmentLength), and libiscsi
        // sends each as two send() calls, a 48-byte header and the data: with TCP_NODELAY,
        // two segments and two wake-ups at the target per 8 KiB. Corked while libiscsi
        // writes, what one call sends leaves in full segments.
        let writing = revents & Int16(POLLOUT) != 0
        if writing { _ = ferry_tcp_cork(iscsi_get_fd(ctx), 1) }
        defer { if writing { _ = ferry_tcp_cork(iscsi_get_fd(ctx), 0) } }
        if iscsi_service(ctx, Int32(revents)) < 0 {
            return FerryError(.io, "the connection to the iSCSI target was lost: \(libiscsiError())", path: name, errno: ENOTCONN)
        }
        return nil
    }

    private static let pieceCallback: iscsi_command_cb = { _, status, commandData, privateData in
        let p = Unmanaged<ISCSIPiece>.fromOpaque(privateData!).takeRetainedValue()
        let task = commandData?.assumingMemoryBound(to: scsi_task.self)
        if let s = p.session { s.library.answered(p, status: status, task: task, in: s) }
        if let task { scsi_free_scsi_task(task) }
    }

    func issue(_ p: ISCSIPiece, _ session: ISCSIConnection) {
        guard let ctx = context else { return }
        p.session = session
        p.status = []
        let token = Unmanaged.passRetained(p).toOpaque()
        let cb = Self.pieceCallback
        let bs = blockSize
        let task: UnsafeMutablePointer<scsi_task>?
        switch p.operation {
        case .read(let buffer, let lba, let blocks):
            let bytes = Int(blocks) * Int(bs)
            p.iov = scsi_iovec(iov_base: buffer, iov_len: bytes)
            task = withUnsafeMutablePointer(to: &p.iov) { iov in
                iscsi_read16_iov_task(ctx, lun, lba, UInt32(bytes), bs, 0, 0, 0, 0, 0, cb, token, iov, 1)
            }
        case .write(let buffer, let lba, let blocks, let fua):
            let bytes = Int(blocks) * Int(bs)
            p.iov = scsi_iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer), iov_len: bytes)
            task = withUnsafeMutablePointer(to: &p.iov) { iov in
                iscsi_write16_iov_task(ctx, lun, lba, nil, UInt32(bytes), bs, 0, 0, fua ? 1 : 0, 0, 0, cb, token, iov, 1)
            }
        case .writeSame(let lba, let blocks, let unmap):
            task = iscsi_writesame16_task(ctx, lun, lba, zeroBlock?.assumingMemoryBound(to: UInt8.self), UInt32(bs), blocks,
                                          0, unmap ? 1 : 0, 0, 0, cb, token)
        case .unmap(let lba, let blocks):
            p.unmapRange = unmap_list(lba: lba, num: blocks)
            task = withUnsafeMutablePointer(to: &p.unmapRange) { list in
                iscsi_unmap_task(ctx, lun, 0, 0, list, 1, cb, token)
            }
        case .sync:
            task = iscsi_synchronizecache16_task(ctx, lun, 0, 0, 0, 0, cb, token)
        case .lbaStatus(let lba):
            task = iscsi_get_lba_status_task(ctx, lun, lba, 8 + 16 * 256, cb, token)
        }
        if task == nil {
            Unmanaged<ISCSIPiece>.fromOpaque(token).release()
            session.complete(p, error: FerryError(.io, "\(p.operation.verb) could not be sent: \(libiscsiError())",
                                                  path: name, offset: p.offset))
        }
    }

    /// A completion callback (inside `iscsi_service` or `iscsi_destroy_context`, on this thread).
    private func answered(_ p: ISCSIPiece, status: Int32, task: UnsafeMutablePointer<scsi_task>?, in session: ISCSIConnection) {
        // Already failed (the session died): the caller may be gone, and its buffer with it.
        guard session.isOutstanding(p) else { return }
        let at = p.offset
        if status == SCSIStatus.good {
            if case .lbaStatus = p.operation, let task, let raw = scsi_datain_unmarshall(task) {
                let answer = raw.assumingMemoryBound(to: scsi_get_lba_status.self).pointee
                if let d = answer.descriptors {
                    for i in 0 ..< Int(answer.num_descriptors) {
                        p.status.append(LBAStatus(lba: d[i].lba, blocks: d[i].num_blocks, provisioning: d[i].provisioning.rawValue))
                    }
                }
            }
            session.complete(p, error: nil)
            return
        }
        if status == SCSIStatus.checkCondition, let task {
            let s = describeSense(task)
            let code: FerryError.Code = s.key == 0x07 ? .readOnly : .io
            // MEDIUM ERROR, HARDWARE ERROR and ABORTED COMMAND may not happen again: sent again.
            let transient = s.key == 0x03 || s.key == 0x04 || s.key == 0x0b
            session.complete(p, error: FerryError(code, "\(p.operation.verb) failed: \(s.text)", path: name, offset: at,
                                                  errno: transient ? EIO : nil))
            return
        }
        let what: String
        switch status {
        // Ferry never aborts a task: libiscsi cancels what is in flight when the session drops.
        case SCSIStatus.cancelled: what = "was cancelled: the connection to the iSCSI target was lost (\(libiscsiError()))"
        case SCSIStatus.timeout: what = "timed out"
        case SCSIStatus.error: what = "failed: \(libiscsiError())"
        default: what = "failed with SCSI status 0x\(String(status, radix: 16)): \(libiscsiError())"
        }
        // A cancelled task lost its connection: a reconnect takes it back.
        session.complete(p, error: FerryError(.io, "\(p.operation.verb) \(what)", path: name, offset: at,
                                              errno: status == SCSIStatus.cancelled ? ENOTCONN : nil))
    }
}
