import FerryCore

/// One extent line of a VMDK text descriptor: `RW 4194304 SPARSE "disk-s001.vmdk" [offset]`.
struct VMDKDescriptorExtent: Sendable, Equatable {
    var access: String
    var sectors: Int64
    /// As written: FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, VMFSRAW, VMFSRDM, SESPARSE.
    var type: String
    var fileName: String?
    /// Where the extent starts in its file, in sectors (flat extents).
    var offset: Int64
}

/// What Ferry needs of a VMDK text descriptor (embedded in a sparse file or a file of its own).
struct VMDKParsedDescriptor: Sendable {
    var cid: UInt32 = 0
    var parentCID: UInt32 = 0xFFFF_FFFF
    var createType: String = ""
    var parentFileNameHint: String?
    var extents: [VMDKDescriptorExtent] = []

    /// The most text Ferry reads as a descriptor (qemu's and VMware's are a few hundred bytes).
    static let maxBytes = 64 << 10
    /// More extent lines than any real image has (a 64 TiB twoGbMaxExtent image has 32768).
    static let maxExtents = 65536

    /// Parses `bytes` (up to the first NUL). `path` and `at` (where the text lies in the file)
    /// are for errors.
    init(_ bytes: [UInt8], path: String, at base: Int64) throws {
        let end = bytes.firstIndex(of: 0) ?? bytes.count
        let text = String(decoding: bytes[0 ..< end], as: UTF8.self)
        var lineStart = base
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            defer { lineStart += Int64(rawLine.utf8.count + 1) }
            var line = Substring(rawLine)
            while let c = line.last, c == "\r" || c == " " || c == "\t" { line = line.dropLast() }
            while let c = line.first, c == " " || c == "\t" { line = line.dropFirst() }
            if line.isEmpty || line.hasPrefix("#") { continue }
            let firstWord = line.prefix { $0 != " " && $0 != "\t" }
            if firstWord.count < line.count, ["RW", "RDONLY", "NOACCESS"].contains(firstWord) {
                guard extents.count < Self.maxExtents else {
                    throw FerryError(.corrupt, "vmdk descriptor has more than \(Self.maxExtents) extents", path: path, offset: lineStart)
                }
                extents.append(try Self.extent(line, path: path, at: lineStart))
                continue
            }
            guard let eq = line.firstIndex(of: "=") else { continue }
            let key = line[..<eq].vmdkReadTrimmed(in: " \t")
            var value = line[line.index(after: eq)...].vmdkReadTrimmed(in: " \t")
            if value.count >= 2, value.hasPrefix("\""), value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            switch key {
            case "CID", "parentCID":
                guard let v = UInt32(value, radix: 16) else {
                    throw FerryError(.corrupt, "vmdk descriptor has an invalid \(key) '\(value.prefix(40))'", path: path, offset: lineStart)
                }
                if key == "CID" { cid = v } else { parentCID = v }
            case "createType": createType = value
            case "parentFileNameHint": parentFileNameHint = value
            default: break
            }
        }
    }

    /// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; the file name is quoted and may hold spaces.
    private static func extent(_ line: Substring, path: String, at: Int64) throws -> VMDKDescriptorExtent {
        func bad(_ why: String) -> FerryError {
            FerryError(.corrupt, "vmdk descriptor extent line '\(line.prefix(80))' is invalid: \(why)", path: path, offset: at)
        }
        var rest = line[...]
        func word() -> Substring? {
            while let c = rest.first, c == " " || c == "\t" { rest = rest.dropFirst() }
            guard !rest.isEmpty else { return nil }
            let end = rest.firstIndex(where: { $0 == " " || $0 == "\t" }) ?? rest.endIndex
            defer { rest = rest[end...] }
            return rest[..<end]
        }
        guard let access = word(), let count = word(), let type = word() else { throw bad("too few fields") }
        guard let sectors = Int64(count), sectors >= 0, sectors <= Int64(1) << 53 else { throw bad("the sector count '\(count.prefix(24))' is not a number of sectors") }
        while let c = rest.first, c == " " || c == "\t" { rest = rest.dropFirst() }
        var fileName: String?
        var offset: Int64 = 0
        if rest.first == "\"" {
            rest = rest.dropFirst()
            guard let close = rest.firstIndex(of: "\"") else { throw bad("the file name has no closing quote") }
            fileName = String(rest[..<close])
            rest = rest[rest.index(after: close)...]
            if let o = word() {
                guard let v = Int64(o), v >= 0, v <= Int64(1) << 53 else { throw bad("the offset '\(o.prefix(24))' is not a number of sectors") }
                offset = v
            }
        } else if !rest.isEmpty {
            throw bad("the file name is not quoted")
        }
        let t = type.uppercased()
        if t != "ZERO" && fileName == nil { throw bad("a \(type) extent needs a file name") }
        return VMDKDescriptorExtent(access: String(access), sectors: sectors, type: String(type), fileName: fileName, offset: offset)
    }
}

private extension Substring {
    func vmdkReadTrimmed(in set: String) -> String {
        var s = self
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}
