import FerryCore
import FerryFile
import FerryFormats
#if canImport(Glibc)
import Glibc
#endif

/// An OVA: a tar archive holding an OVF descriptor (`.ovf`), its disks and perhaps a
/// manifest (`.mf`) of their digests. Disks are read in place, as `appliance.ova/disk1.vmdk`.
public struct OVAPackage: Sendable {
    /// Largest descriptor or manifest read into memory; real ones are a few KiB.
    public static let maxTextMember: Int64 = 4 << 20

    public let archive: TarArchive
    /// The `.ovf` member (the first one: the OVF specification puts it first).
    public let descriptor: TarMember?
    /// The `.mf` member, preferably the one named after the descriptor.
    public let manifest: TarMember?
    /// The manifest's digests by file name, in the manifest's order.
    public let digests: [(name: String, algorithm: DigestAlgorithm, hex: String)]
    /// The files the descriptor's `References` name (`ovf:href`), with `ovf:compression` if any.
    public let references: [(href: String, compression: String?)]

    /// Reads the archive's headers, the descriptor's references and the manifest.
    public static func read(_ file: any BlockDevice) async throws -> OVAPackage {
        let archive = try await TarArchive.read(file)
        let files = archive.members.filter { $0.kind == .file }
        let descriptor = files.first { $0.name.lowercased().hasSuffix(".ovf") }
        let manifests = files.filter { $0.name.lowercased().hasSuffix(".mf") }
        let stem = descriptor.map { String($0.name.dropLast(4)) }
        let manifest = manifests.first { String($0.name.dropLast(3)) == stem } ?? manifests.first
        var references: [(String, String?)] = []
        if let d = descriptor {
            references = OVF.references(try await text(of: d, in: file, what: "OVF descriptor"))
        }
        var digests: [(String, DigestAlgorithm, String)] = []
        if let m = manifest {
            digests = try parseManifest(try await text(of: m, in: file, what: "manifest"), member: m, path: file.name)
        }
        return OVAPackage(archive: archive, descriptor: descriptor, manifest: manifest,
                          digests: digests.map { (name: $0.0, algorithm: $0.1, hex: $0.2) },
                          references: references.map { (href: $0.0, compression: $0.1) })
    }

    private static func text(of member: TarMember, in file: any BlockDevice, what: String) async throws -> [UInt8] {
        guard member.size <= maxTextMember else {
            throw FerryError(.corrupt, "the \(what) '\(member.name)' is \(member.size) bytes (at most \(maxTextMember) are read)",
                             path: file.name, offset: member.headerOffset)
        }
        return try await TarArchive.readBytes(file, at: member.dataOffset, count: Int(member.size))
    }

    /// Manifest lines: `SHA256(disk1.vmdk)= 3a7b...` (the space after `=` is optional).
    static func parseManifest(_ bytes: [UInt8], member: TarMember, path: String) throws -> [(String, DigestAlgorithm, String)] {
        var out: [(String, DigestAlgorithm, String)] = []
        var lineStart = 0
        for (number, line) in bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false).enumerated() {
            defer { lineStart += line.count + 1 }
            let text = String(decoding: line, as: UTF8.self).trimmingSpaces
            if text.isEmpty { continue }
            let bad = FerryError(.corrupt, "manifest '\(member.name)' line \(number + 1) is not 'ALGORITHM(file)= digest'",
                                 path: path, offset: member.dataOffset + Int64(lineStart))
            guard let open = text.firstIndex(of: "("), let close = text.lastIndex(of: ")"), open < close,
                  text[text.index(after: close)...].first == "=" else { throw bad }
            let algorithmName = text[..<open].trimmingSpaces.uppercased()
            guard let algorithm = DigestAlgorithm(rawValue: algorithmName) else {
                throw FerryError(.notSupported, "manifest '\(member.name)' line \(number + 1) uses the digest '\(algorithmName)' (supported: SHA1, SHA256, SHA512)",
                                 path: path, offset: member.dataOffset + Int64(lineStart))
            }
            var name = Substring(text[text.index(after: open) ..< close])
            while name.hasPrefix("./") { name = name.dropFirst(2) }
            let hex = text[text.index(close, offsetBy: 2)...].trimmingSpaces.lowercased()
            guard hex.count == algorithm.length * 2, hex.allSatisfy({ $0.isHexDigit }) else { throw bad }
            out.append((String(name), algorithm, hex))
        }
        return out
    }

    /// The manifest's entry for `name`.
    public func digest(of name: String) -> (algorithm: DigestAlgorithm, hex: String)? {
        digests.first { $0.name == name }.map { ($0.algorithm, $0.hex) }
    }

    /// What the manifest says of a member: the verdict once its digest has been computed.
    public enum Verdict: Sendable, Equatable {
        case matched(DigestAlgorithm)
        case mismatch(DigestAlgorithm, expected: String, actual: String)
        /// The archive has no manifest.
        case noManifest
        /// There is a manifest but it does not list this member.
        case notListed
        /// The manifest itself (never listed in itself).
        case isManifest
    }

    /// Hashes `member` and compares it with the manifest.
    public func verify(_ member: TarMember, in file: any BlockDevice) async throws -> Verdict {
        if manifest == nil { return .noManifest }
        if member == manifest { return .isManifest }
        guard let (algorithm, expected) = digest(of: member.name) else { return .notListed }
        let actual = try await Digest.hash(file, range: member.dataOffset ..< member.dataOffset + member.size, algorithm: algorithm)
        return actual == expected ? .matched(algorithm) : .mismatch(algorithm, expected: expected, actual: actual)
    }

    /// Members that hold a disk image: those the descriptor references, and any other whose
    /// first bytes are an image format's (an OVA without a usable descriptor still lists them).
    public func diskMembers(in file: any BlockDevice) async throws -> [TarMember] {
        var out: [TarMember] = []
        let referenced = Set(references.map(\.href))
        for m in archive.members where m.kind == .file && m != descriptor && m != manifest {
            if referenced.contains(m.name) {
                out.append(m)
                continue
            }
            let lower = m.name.lowercased()
            if lower.hasSuffix(".cert") || lower.hasSuffix(".ovf") || lower.hasSuffix(".mf") { continue }
            let n = Int(min(m.size, 4096))
            guard n > 0 else { continue }
            let header = try await TarArchive.readBytes(file, at: m.dataOffset, count: n)
            let known = header.withUnsafeBytes { h in
                Formats.all.contains { $0.probe(header: h) }
                    || Formats.recognisedOnly.contains { h.count >= $0.magic.count && h.prefix($0.magic.count).elementsEqual($0.magic) }
            }
            if known { out.append(m) }
        }
        return out
    }
}

/// What little of an OVF descriptor (DMTF DSP0243) reading the disks needs: the `href` of
/// each `File` element of `References`. A scan of the XML, not a parser: namespace prefixes
/// are ignored, entities in names are not expanded.
enum OVF {
    static func references(_ xml: [UInt8]) -> [(String, String?)] {
        let text = String(decoding: xml, as: UTF8.self)
        var out: [(String, String?)] = []
        guard let refsStart = elementStart(text, "References", from: text.startIndex) else { return out }
        let refsEnd = elementStart(text, "References", from: text.index(after: refsStart), closing: true) ?? text.endIndex
        var cursor = refsStart
        while let fileStart = elementStart(text, "File", from: cursor), fileStart < refsEnd {
            guard let tagEnd = text[fileStart...].firstIndex(of: ">") else { break }
            let tag = text[fileStart ..< tagEnd]
            if let href = attribute(tag, "href") {
                out.append((href, attribute(tag, "compression")))
            }
            cursor = tagEnd
        }
        return out
    }

    /// The start of the next `<NAME` or `<prefix:NAME` tag at or after `from` (`</...` with `closing`).
    private static func elementStart(_ text: String, _ name: String, from: String.Index, closing: Bool = false) -> String.Index? {
        var search = from
        while let lt = text[search...].firstIndex(of: "<") {
            let after = text.index(after: lt)
            var nameEnd = after
            if nameEnd < text.endIndex, text[nameEnd] == "/" { nameEnd = text.index(after: nameEnd) }
            while nameEnd < text.endIndex, !" \t\r\n/>".contains(text[nameEnd]) { nameEnd = text.index(after: nameEnd) }
            var qualified = text[after ..< nameEnd]
            let isClosing = qualified.first == "/"
            if isClosing { qualified = qualified.dropFirst() }
            let local = qualified.split(separator: ":").last.map(String.init) ?? ""
            if local == name && isClosing == closing { return lt }
            search = after
        }
        return nil
    }

    /// The value of `prefix:NAME="..."` (or `NAME='...'`) in a tag.
    private static func attribute(_ tag: Substring, _ name: String) -> String? {
        var i = tag.startIndex
        while i < tag.endIndex {
            guard let eq = tag[i...].firstIndex(of: "=") else { return nil }
            var keyStart = eq
            while keyStart > tag.startIndex, !" \t\r\n".contains(tag[tag.index(before: keyStart)]) { keyStart = tag.index(before: keyStart) }
            let key = tag[keyStart ..< eq].split(separator: ":").last.map(String.init) ?? ""
            let q = tag.index(after: eq)
            guard q < tag.endIndex, tag[q] == "\"" || tag[q] == "'" else { i = q; continue }
            let quote = tag[q]
            let valueStart = tag.index(after: q)
            guard let valueEnd = tag[valueStart...].firstIndex(of: quote) else { return nil }
            if key == name { return String(tag[valueStart ..< valueEnd]) }
            i = tag.index(after: valueEnd)
        }
        return nil
    }
}

/// `appliance.ova/disk1.vmdk`: how a location names a member of an archive.
public enum ArchiveLocation {
    /// Names a file may have to be read as an archive (case-insensitive).
    public static let suffixes = [".ova", ".tar"]

    public static func isArchiveName(_ path: String) -> Bool {
        let lower = path.lowercased()
        return suffixes.contains { lower.hasSuffix($0) }
    }

    /// `(archive, member)` if `location` does not exist as it is but a leading part of it is
    /// a regular file named like an archive.
    public static func split(_ location: String) -> (archive: String, member: String)? {
        guard Images.urlScheme(location) == nil else { return nil }
        var st = stat()
        if stat(location, &st) == 0 { return nil }
        var end = location.endIndex
        while let slash = location[..<end].lastIndex(of: "/") {
            let head = String(location[..<slash])
            let tail = String(location[location.index(after: slash)...])
            if !head.isEmpty, !tail.isEmpty, isArchiveName(head), stat(head, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG {
                return (head, tail)
            }
            end = slash
        }
        return nil
    }

    /// For a URL (`nfs://host/export/appliance.ova/disk1.vmdk?version=4`): the URL of the
    /// archive (the path up to its last component named like an archive, with the query) and
    /// the member's name.
    public static func splitURL(_ location: String) -> (archive: String, member: String)? {
        guard Images.urlScheme(location) != nil else { return nil }
        let query = location.firstIndex(of: "?") ?? location.endIndex
        let base = location[..<query]
        // The path starts after `scheme://host`.
        let chars = Array(base.utf8)
        guard let colon = chars.firstIndex(of: UInt8(ascii: ":")), chars.count > colon + 3,
              let hostEnd = chars[(colon + 3)...].firstIndex(of: UInt8(ascii: "/")) else { return nil }
        let pathStart = base.utf8.index(base.startIndex, offsetBy: hostEnd)
        var end = base.endIndex
        while let slash = base[..<end].lastIndex(of: "/"), slash > pathStart {
            let head = base[..<slash]
            let tail = base[base.index(after: slash)...]
            if !tail.isEmpty, isArchiveName(String(head)) {
                return (String(head) + location[query...], String(tail))
            }
            end = slash
        }
        return nil
    }

    /// True if `location` is to be read as an archive: any `*.ova` (so that a damaged one is
    /// reported as a damaged archive, not read as a raw disk), and a `*.tar` whose first block
    /// has the ustar magic. Local regular files, and nfs:// URLs.
    public static func isArchive(_ location: String) async -> Bool {
        let scheme = Images.urlScheme(location)
        guard scheme == nil || scheme == "nfs" else { return false }
        let path = scheme == nil ? location : String(location[..<(location.firstIndex(of: "?") ?? location.endIndex)])
        guard isArchiveName(path) else { return false }
        if scheme == nil {
            var st = stat()
            guard stat(location, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return false }
        }
        if path.lowercased().hasSuffix(".ova") { return true }
        guard let file = try? await openArchive(location) else { return false }
        let block = file.size < 512 ? nil : try? await TarArchive.readBytes(file, at: 0, count: TarArchive.blockSize)
        try? await file.close()
        return block.map { TarArchive.hasUstarMagic($0) } ?? false
    }

    /// The location of `member` inside the archive at `archive` (inside a URL's path, before
    /// its query).
    public static func memberLocation(_ archive: String, _ member: String) -> String {
        guard Images.urlScheme(archive) != nil, let q = archive.firstIndex(of: "?") else { return archive + "/" + member }
        return archive[..<q] + "/" + member + archive[q...]
    }

    /// The archive at a local path or URL, read-only.
    static func openArchive(_ location: String) async throws -> any BlockDevice {
        Images.urlScheme(location) == nil ? try await openArchiveFile(location)
            : try await Images.openEndpoint(location, readOnly: true)
    }

    /// The archive file, through the page cache: members start on 512-byte boundaries, which
    /// O_DIRECT on a 4 KiB-sector disk would not accept.
    static func openArchiveFile(_ path: String) async throws -> FileDevice {
        try await FileDevice.open(path: path, options: FileDevice.Options(readOnly: true))
    }

    static func refuseWrite(archive: String, location: String) -> FerryError {
        FerryError(.readOnly, "cannot write into '\(archive)': a disk inside an OVA or tar archive is read-only", path: location)
    }

    /// Opens `member` of the local archive at `archive` as a read-only device named `location`.
    static func openMember(archive: String, member: String, location: String, readOnly: Bool) async throws -> SliceDevice {
        guard readOnly else { throw refuseWrite(archive: archive, location: location) }
        return try await openMember(of: try await openArchiveFile(archive), archive: archive, member: member, location: location)
    }

    /// Opens `member` of the archive in `file` (which the result then owns; closed on failure).
    static func openMember(of file: any BlockDevice, archive: String, member: String, location: String) async throws -> SliceDevice {
        do {
            let package = try await OVAPackage.read(file)
            let name = try TarArchive.cleanName(member, at: 0, path: location)
            guard let m = package.archive.member(named: name) else {
                let names = package.archive.members.filter { $0.kind == .file }.map(\.name)
                throw FerryError(.notFound, "no member '\(member)' in the archive (members: \(names.isEmpty ? "none" : names.joined(separator: ", ")))",
                                 path: archive)
            }
            guard m.kind == .file else {
                throw FerryError(.notSupported, "member '\(member)' is not a regular file (tar type '\(m.kindLetter)')",
                                 path: archive, offset: m.headerOffset)
            }
            if let c = package.references.first(where: { $0.href == name })?.compression, !c.isEmpty, c != "identity" {
                throw FerryError(.notSupported, "the OVF descriptor says '\(member)' is \(c)-compressed, which cannot be read in place",
                                 path: archive)
            }
            return try SliceDevice(file, start: m.dataOffset, size: m.size, name: location, ownsBase: true)
        } catch {
            try? await file.close()
            throw error
        }
    }
}

extension TarMember {
    /// What `info` calls the member's type.
    public var typeName: String {
        switch kind {
        case .file: return "file"
        case .directory: return "directory"
        case .other(let t) where t == UInt8(ascii: "1") || t == UInt8(ascii: "2"): return "link"
        case .other: return "other"
        }
    }

    /// The tar type letter, for messages.
    var kindLetter: String {
        switch kind {
        case .file: return "0"
        case .directory: return "5"
        case .other(let t): return t >= 0x20 && t < 0x7f ? String(UnicodeScalar(t)) : "0x" + String(t, radix: 16)
        }
    }
}

extension StringProtocol {
    var trimmingSpaces: String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first ... last])
    }
}
