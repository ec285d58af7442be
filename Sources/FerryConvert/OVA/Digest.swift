import CFerryCrypto
import CLibCrypto
import FerryCore

/// The digests an OVF manifest may use.
public enum DigestAlgorithm: String, Sendable, CaseIterable {
    case sha1 = "SHA1"
    case sha256 = "SHA256"
    case sha512 = "SHA512"

    /// Bytes of a digest.
    public var length: Int {
        switch self {
        case .sha1: return 20
        case .sha256: return 32
        case .sha512: return 64
        }
    }
}

/// A running digest (OpenSSL's EVP interface). Used by one task at a time.
final class Digest {
    private let context: OpaquePointer

    init(_ algorithm: DigestAlgorithm) throws {
        if let why = ferry_crypto_load_error() {
            throw FerryError(.notSupported, "checking a manifest needs OpenSSL's libcrypto: \(String(cString: why))")
        }
        guard let ctx = EVP_MD_CTX_new() else {
            throw FerryError(.other, "could not allocate a digest context")
        }
        let md: OpaquePointer?
        switch algorithm {
        case .sha1: md = EVP_sha1()
        case .sha256: md = EVP_sha256()
        case .sha512: md = EVP_sha512()
        }
        guard EVP_DigestInit_ex(ctx, md, nil) == 1 else {
            EVP_MD_CTX_free(ctx)
            throw FerryError(.notSupported, "\(algorithm.rawValue) is not available in this OpenSSL")
        }
        context = ctx
    }

    deinit { EVP_MD_CTX_free(context) }

    func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, !bytes.isEmpty else { return }
        EVP_DigestUpdate(context, base, bytes.count)
    }

    /// The digest in lower-case hex.
    func finish() -> String {
        var out = [UInt8](repeating: 0, count: Int(EVP_MAX_MD_SIZE))
        var length: UInt32 = 0
        EVP_DigestFinal_ex(context, &out, &length)
        return Self.hex(out.prefix(Int(length)))
    }

    /// Bytes in lower-case hex.
    static func hex(_ bytes: some Collection<UInt8>) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var s: [UInt8] = []
        s.reserveCapacity(bytes.count * 2)
        for b in bytes {
            s.append(digits[Int(b >> 4)])
            s.append(digits[Int(b & 15)])
        }
        return String(decoding: s, as: UTF8.self)
    }

    /// Hashes `range` of `device`, front to back, a MiB at a time (in the device's aligned
    /// blocks and transfer limit).
    static func hash(_ device: any BlockDevice, range: Range<Int64>, algorithm: DigestAlgorithm) async throws -> String {
        let digest = try Digest(algorithm)
        let a = Int64(device.limits.alignment)
        let chunk = max(a, min(Int64(1 << 20), Int64(device.limits.maximumTransfer)) / a * a)
        let buffer = AlignedBuffer(count: Int(chunk))
        let end = min(device.size, (range.upperBound + a - 1) / a * a)
        var pos = range.lowerBound / a * a
        while pos < range.upperBound {
            try Task.checkCancellation()
            let hi = min(pos + chunk, end)
            try await device.read(at: pos, into: buffer.slice(0 ..< Int(hi - pos)))
            let lo = max(pos, range.lowerBound), top = min(hi, range.upperBound)
            digest.update(UnsafeRawBufferPointer(rebasing: buffer.bytes[Int(lo - pos) ..< Int(top - pos)]))
            pos = hi
        }
        return digest.finish()
    }
}
