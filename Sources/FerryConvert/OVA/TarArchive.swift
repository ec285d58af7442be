import FerryCore

/// One entry of a tar archive.
public struct TarMember: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// A regular file: its bytes are `dataOffset ..< dataOffset + size` of the archive.
        case file
        case directory
        /// Anything else (links, devices, GNU sparse files): listed, never read.
        case other(type: UInt8)
    }
    /// The path inside the archive, without a leading `./`.
    public var name: String
    public var kind: Kind
    /// Where the member's first header (an extension header, if it has one) starts.
    public var headerOffset: Int64
    public var dataOffset: Int64
    public var size: Int64
}

/// The table of contents of a POSIX ustar archive (with GNU long names, GNU base-256 sizes
/// and PAX `path`/`size` records), read through a `BlockDevice` without unpacking it.
///
/// The archive is untrusted: every header's checksum is verified, every number is checked
/// before use, every member's data must lie inside the file, and nothing is allocated in
/// proportion to a number the file gives (names and extension records are bounded, and so is
/// the number of members).
public struct TarArchive: Sendable {
    public static let blockSize = 512
    /// More members than an appliance ever has; a bound on the table, not on the archive's size.
    public static let maxMembers = 10_000
    /// Longest name (GNU `L` record or PAX `path`), in bytes: PATH_MAX.
    public static let maxNameBytes = 4096
    /// Largest PAX extended header read.
    public static let maxExtendedHeader = 64 << 10
    /// Extension headers (`L`, `K`, `x`, `g`) allowed before one member's own header.
    public static let maxExtensionHeaders = 8

    /// The archive's name, for messages.
    public let path: String
    public let members: [TarMember]
    /// Bytes of the archive file.
    public let size: Int64

    public func member(named name: String) -> TarMember? {
        members.first { $0.name == name }
    }

    /// True if `block` (at least 512 bytes) is a ustar header (POSIX or GNU magic) with a
    /// valid checksum: how an archive is told from a disk image.
    public static func isHeader(_ block: UnsafeRawBufferPointer) -> Bool {
        guard block.count >= blockSize else { return false }
        let b = Array(block.prefix(blockSize))
        return hasUstarMagic(b) && (try? checksumMatches(b, at: 0, path: "")) == true
    }

    /// Reads every header of the archive in `device`.
    public static func read(_ device: any BlockDevice) async throws -> TarArchive {
        let path = device.name
        let fileSize = device.size
        var members: [TarMember] = []
        var names: [String: Int64] = [:]
        var pos: Int64 = 0
        // What extension headers said about the next member.
        var longName: String?
        var paxPath: String?
        var paxSize: Int64?
        var paxSparse = false
        var extensions = 0
        var firstHeader: Int64?

        while pos < fileSize {
            guard fileSize - pos >= Int64(blockSize) else {
                throw FerryError(.corrupt, "tar header at offset \(pos) is truncated: the file ends \(fileSize - pos) bytes into it",
                                 path: path, offset: pos)
            }
            let h = try await readBytes(device, at: pos, count: blockSize)
            if h.allSatisfy({ $0 == 0 }) {
                // End-of-archive marker (a second zero block usually follows; nothing after
                // the first one is read).
                guard extensions == 0 else {
                    throw FerryError(.corrupt, "tar archive ends at offset \(pos) after an extension header with no member",
                                     path: path, offset: pos)
                }
                break
            }
            guard hasUstarMagic(h) else {
                throw FerryError(.corrupt, "tar header at offset \(pos) has no ustar magic (not a POSIX or GNU tar archive, or damaged)",
                                 path: path, offset: pos)
            }
            guard try checksumMatches(h, at: pos, path: path) else {
                throw FerryError(.corrupt, "tar header at offset \(pos) has a bad checksum", path: path, offset: pos)
            }
            let type = h[156]
            let headerSize = try number(h, 124, 12, field: "size", at: pos, path: path)
            var dataOffset = pos + Int64(blockSize)
            if type == UInt8(ascii: "S") && h[482] != 0 {
                // Old GNU sparse: more sparse maps follow the header, each flagging the next.
                var more = true
                while more {
                    guard fileSize - dataOffset >= Int64(blockSize) else {
                        throw FerryError(.corrupt, "tar GNU sparse map at offset \(dataOffset) is truncated", path: path, offset: dataOffset)
                    }
                    more = try await readBytes(device, at: dataOffset, count: blockSize)[504] != 0
                    dataOffset += Int64(blockSize)
                }
            }
            // PAX `size` overrides the header for the member it describes (files over 8 GiB).
            let isExtension = type == UInt8(ascii: "L") || type == UInt8(ascii: "K")
                || type == UInt8(ascii: "x") || type == UInt8(ascii: "g")
            let size = isExtension ? headerSize : (paxSize ?? headerSize)
            guard size <= fileSize - dataOffset else {
                throw FerryError(.corrupt, "tar member at offset \(pos) claims \(size) bytes of data, past the end of the file (\(fileSize) bytes)",
                                 path: path, offset: pos)
            }
            // Padding to a whole block; a last member whose padding is missing still ends the archive cleanly.
            let next = dataOffset + (size + Int64(blockSize) - 1) / Int64(blockSize) * Int64(blockSize)
            if firstHeader == nil { firstHeader = pos }

            if isExtension {
                extensions += 1
                guard extensions <= maxExtensionHeaders else {
                    throw FerryError(.corrupt, "tar header at offset \(pos) is one of more than \(maxExtensionHeaders) extension headers in a row",
                                     path: path, offset: pos)
                }
                switch type {
                case UInt8(ascii: "L"):
                    guard size <= Int64(maxNameBytes) else {
                        throw FerryError(.corrupt, "tar GNU long name at offset \(pos) is \(size) bytes (at most \(maxNameBytes))", path: path, offset: pos)
                    }
                    let bytes = try await readBytes(device, at: dataOffset, count: Int(size))
                    longName = String(decoding: bytes.prefix(while: { $0 != 0 }), as: UTF8.self)
                case UInt8(ascii: "x"):
                    guard size <= Int64(maxExtendedHeader) else {
                        throw FerryError(.corrupt, "tar PAX header at offset \(pos) is \(size) bytes (at most \(maxExtendedHeader))", path: path, offset: pos)
                    }
                    let bytes = try await readBytes(device, at: dataOffset, count: Int(size))
                    for (key, value) in try paxRecords(bytes, at: pos, path: path) {
                        switch key {
                        case "path":
                            guard value.count <= maxNameBytes, !value.contains(0) else {
                                throw FerryError(.corrupt, "tar PAX header at offset \(pos) has an invalid path", path: path, offset: pos)
                            }
                            paxPath = String(decoding: value, as: UTF8.self)
                        case "size":
                            guard let s = decimal(value) else {
                                throw FerryError(.corrupt, "tar PAX header at offset \(pos) has an invalid size", path: path, offset: pos)
                            }
                            paxSize = s
                        default:
                            if key.hasPrefix("GNU.sparse.") { paxSparse = true }
                        }
                    }
                default:
                    // `K` (long link name) and `g` (global records) say nothing a reader in place needs.
                    break
                }
                pos = next
                continue
            }

            guard members.count < maxMembers else {
                throw FerryError(.corrupt, "tar archive has more than \(maxMembers) members (at offset \(pos))", path: path, offset: pos)
            }
            var raw: String
            if let p = paxPath {
                raw = p
            } else if let l = longName {
                raw = l
            } else {
                raw = field(h, 0, 100)
                // The POSIX prefix field; GNU headers keep times there instead.
                if h[257 ..< 263].elementsEqual(Array("ustar\0".utf8)) {
                    let prefix = field(h, 345, 155)
                    if !prefix.isEmpty { raw = prefix + "/" + raw }
                }
            }
            let name = try cleanName(raw, at: firstHeader ?? pos, path: path)
            let kind: TarMember.Kind
            switch type {
            case 0, UInt8(ascii: "0"), UInt8(ascii: "7"):
                kind = paxSparse ? .other(type: UInt8(ascii: "S")) : .file
            case UInt8(ascii: "5"):
                kind = .directory
            default:
                kind = .other(type: type)
            }
            if kind == .file {
                if let earlier = names[name] {
                    throw FerryError(.corrupt, "tar member '\(name)' at offset \(firstHeader ?? pos) appears twice (first at offset \(earlier))",
                                     path: path, offset: firstHeader ?? pos)
                }
                names[name] = firstHeader ?? pos
            }
            members.append(TarMember(name: name, kind: kind, headerOffset: firstHeader ?? pos, dataOffset: dataOffset, size: size))
            longName = nil
            paxPath = nil
            paxSize = nil
            paxSparse = false
            extensions = 0
            firstHeader = nil
            pos = next
        }
        if extensions > 0 {
            throw FerryError(.corrupt, "tar archive ends after an extension header with no member", path: path, offset: firstHeader)
        }
        return TarArchive(path: path, members: members, size: fileSize)
    }

    // MARK: - Fields

    static func hasUstarMagic(_ h: [UInt8]) -> Bool {
        let magic = h[257 ..< 263]
        return magic.elementsEqual(Array("ustar\0".utf8)) || magic.elementsEqual(Array("ustar ".utf8))
    }

    /// The checksum is the sum of the header's bytes with the checksum field as spaces.
    /// Old writers summed signed bytes; either sum is accepted, as tar implementations do.
    static func checksumMatches(_ h: [UInt8], at offset: Int64, path: String) throws -> Bool {
        let stored = try number(h, 148, 8, field: "checksum", at: offset, path: path)
        var unsigned: Int64 = 0
        var signed: Int64 = 0
        for i in 0 ..< blockSize {
            let b = (148 ..< 156).contains(i) ? UInt8(ascii: " ") : h[i]
            unsigned += Int64(b)
            signed += Int64(Int8(bitPattern: b))
        }
        return stored == unsigned || stored == signed
    }

    /// An octal field (leading spaces, digits, then NULs or spaces), or a GNU base-256 field
    /// (first byte 0x80, then a big-endian number).
    static func number(_ h: [UInt8], _ start: Int, _ length: Int, field: String, at offset: Int64, path: String) throws -> Int64 {
        let bytes = h[start ..< start + length]
        let bad = FerryError(.corrupt, "tar header at offset \(offset) has an invalid \(field) field", path: path, offset: offset)
        if let first = bytes.first, first & 0x80 != 0 {
            // 0xff starts a negative number: no size or checksum is negative.
            guard first == 0x80 else { throw bad }
            var v: Int64 = 0
            for b in bytes.dropFirst() {
                guard v <= (Int64.max >> 8) else { throw bad }
                v = v << 8 | Int64(b)
            }
            return v
        }
        var i = bytes.startIndex
        while i < bytes.endIndex && bytes[i] == UInt8(ascii: " ") { i += 1 }
        var v: Int64 = 0
        var digits = 0
        while i < bytes.endIndex, bytes[i] >= UInt8(ascii: "0"), bytes[i] <= UInt8(ascii: "7") {
            guard v <= (Int64.max >> 3) else { throw bad }
            v = v << 3 | Int64(bytes[i] - UInt8(ascii: "0"))
            digits += 1
            i += 1
        }
        while i < bytes.endIndex {
            guard bytes[i] == 0 || bytes[i] == UInt8(ascii: " ") else { throw bad }
            i += 1
        }
        guard digits > 0 || field == "size" else { throw bad }
        return v
    }

    /// A NUL-terminated text field.
    static func field(_ h: [UInt8], _ start: Int, _ length: Int) -> String {
        String(decoding: h[start ..< start + length].prefix(while: { $0 != 0 }), as: UTF8.self)
    }

    static func decimal(_ bytes: [UInt8]) -> Int64? {
        guard !bytes.isEmpty, bytes.count <= 18, bytes.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return bytes.reduce(Int64(0)) { $0 * 10 + Int64($1 - 0x30) }
    }

    /// PAX records: `LENGTH KEY=VALUE\n`, LENGTH counting the whole record.
    static func paxRecords(_ data: [UInt8], at offset: Int64, path: String) throws -> [(String, [UInt8])] {
        var out: [(String, [UInt8])] = []
        var i = 0
        let bad = FerryError(.corrupt, "tar PAX header at offset \(offset) has a malformed record", path: path, offset: offset)
        while i < data.count {
            // Writers pad the last block with NULs.
            if data[i] == 0 { break }
            guard let space = data[i...].prefix(20).firstIndex(of: UInt8(ascii: " ")),
                  let length = decimal(Array(data[i ..< space])), length > 0, length <= Int64(data.count - i) else { throw bad }
            let end = i + Int(length)
            guard space + 1 < end else { throw bad }
            guard data[end - 1] == UInt8(ascii: "\n"), let eq = data[(space + 1) ..< (end - 1)].firstIndex(of: UInt8(ascii: "=")) else { throw bad }
            out.append((String(decoding: data[(space + 1) ..< eq], as: UTF8.self), Array(data[(eq + 1) ..< (end - 1)])))
            i = end
        }
        return out
    }

    /// The member's name without `./` or a trailing `/`; absolute names and `..` refused,
    /// so that no name can point outside the archive's own namespace.
    static func cleanName(_ raw: String, at offset: Int64, path: String) throws -> String {
        var parts: [Substring] = []
        for part in raw.split(separator: "/", omittingEmptySubsequences: false) {
            if part == "." || part.isEmpty { continue }
            guard part != ".." else {
                throw FerryError(.corrupt, "tar member name '\(raw)' at offset \(offset) contains '..'", path: path, offset: offset)
            }
            parts.append(part)
        }
        guard !raw.hasPrefix("/") else {
            throw FerryError(.corrupt, "tar member name '\(raw)' at offset \(offset) is an absolute path", path: path, offset: offset)
        }
        return parts.joined(separator: "/")
    }

    /// Reads `count` bytes at `offset`, widening the request to the device's alignment and
    /// splitting it at its transfer limit.
    static func readBytes(_ device: any BlockDevice, at offset: Int64, count: Int) async throws -> [UInt8] {
        guard count > 0 else { return [] }
        let a = Int64(device.limits.alignment)
        let lo = offset / a * a
        let hi = min(device.size, (offset + Int64(count) + a - 1) / a * a)
        let buffer = AlignedBuffer(count: Int(hi - lo))
        let most = max(a, Int64(device.limits.maximumTransfer) / a * a)
        var pos = lo
        while pos < hi {
            let n = min(most, hi - pos)
            try await device.read(at: pos, into: buffer.slice(Int(pos - lo) ..< Int(pos - lo + n)))
            pos += n
        }
        let skip = Int(offset - lo)
        return Array(buffer.bytes[skip ..< skip + count])
    }
}
