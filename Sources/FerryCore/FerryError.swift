#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Every error Ferry reports: what went wrong, in which image, and where.
///
/// `description` is one line meant for a person: `IMAGE: what happened at offset N`.
public struct FerryError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Code: String, Sendable {
        case invalidArgument
        case notFound
        case permissionDenied
        case exists
        case isDirectory
        case notSupported
        case readOnly
        case noSpace
        case io
        /// A device ended before its claimed size.
        case shortRead
        /// A target is smaller than what must be written to it.
        case tooSmall
        /// Image metadata is malformed.
        case corrupt
        /// The user or a signal stopped the operation.
        case cancelled
        /// Another process holds the image (a running VM).
        case busy
        case other
    }

    public var code: Code
    public var message: String
    /// The image, file or URL the error is about.
    public var path: String?
    /// Byte offset in that image, when the error is about one place.
    public var offset: Int64?
    /// The system error number underneath, if any.
    public var errno: Int32?

    public init(_ code: Code, _ message: String, path: String? = nil, offset: Int64? = nil, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.errno = errno
    }

    /// An error from a failed system call, with the code chosen from `errno`.
    public static func posix(_ err: Int32, _ what: String, path: String? = nil, offset: Int64? = nil) -> FerryError {
        let text = String(cString: strerror(err))
        return FerryError(Code(errno: err), "\(what): \(text)", path: path, offset: offset, errno: err)
    }

    public var description: String {
        var s = ""
        if let path { s += "\(path): " }
        s += message
        if let offset, !message.contains("offset") { s += " at offset \(offset)" }
        return s
    }

    /// The same error, said about another image or place, unless it already names one.
    public func at(path: String? = nil, offset: Int64? = nil) -> FerryError {
        var e = self
        if e.path == nil { e.path = path }
        if e.offset == nil { e.offset = offset }
        return e
    }
}

extension FerryError.Code {
    public init(errno err: Int32) {
        switch err {
        case ENOENT: self = .notFound
        case EACCES, EPERM: self = .permissionDenied
        case EEXIST: self = .exists
        case EISDIR: self = .isDirectory
        case EOPNOTSUPP, ENOSYS, ENOTSUP: self = .notSupported
        case EROFS, EBADF: self = .readOnly
        case ENOSPC, EDQUOT, EFBIG: self = .noSpace
        case EINVAL: self = .invalidArgument
        default: self = .io
        }
    }
}
