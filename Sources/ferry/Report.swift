import FerryConvert
import FerryCore
import FerryFormats
#if canImport(Glibc)
import Glibc
#endif

/// The text `ferry info` and `ferry map` print, laid out as qemu-img 7.2 lays it out so that
/// scripts written against qemu-img keep working.
enum Report {
    /// `qemu-img info` (human).
    static func infoHuman(_ info: ImageInfo) -> String {
        var s = "image: \(info.filename)\n"
        s += "file format: \(info.format)\n"
        s += "virtual size: \(ByteSize.human(info.virtualSize)) (\(info.virtualSize) bytes)\n"
        s += "disk size: \(info.actualSize.map(ByteSize.human) ?? "unavailable")\n"
        let d = info.details
        if let cs = d?.clusterSize { s += "cluster_size: \(cs)\n" }
        if info.dirtyFlag { s += "cleanly shut down: no\n" }
        if let d, let b = d.backingFilename {
            s += "backing file: \(b)"
            if let full = d.fullBackingFilename, full != b { s += " (actual path: \(full))" }
            s += "\n"
            if let f = d.backingFormat { s += "backing file format: \(f)\n" }
        }
        if let d, !d.snapshots.isEmpty { s += snapshotList(d.snapshots) }
        if let d, case .object(let top)? = d.formatSpecific, let data = top.first(where: { $0.0 == "data" })?.1,
           case .object(let fields) = data {
            s += "Format specific information:\n"
            s += humanFields(fields, indent: 4)
        }
        return s
    }

    /// `Snapshot list:` and its table, as `info` and `snapshot -l` print it.
    static func snapshotList(_ snapshots: [QCOW2Snapshot]) -> String {
        var s = "Snapshot list:\n"
        s += snapshotRow("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
        for sn in snapshots {
            let ms = sn.vmClockNanoseconds / 1_000_000
            let clock = two(ms / 3_600_000) + ":" + two(ms / 60_000 % 60) + ":" + two(ms / 1000 % 60) + "." + three(ms % 1000)
            s += snapshotRow(sn.id, sn.name, ByteSize.human(sn.vmStateSize), localDate(sn.dateSeconds), clock,
                             sn.icount.map { "\($0)" } ?? "")
        }
        return s
    }

    private static func two(_ v: Int64) -> String { v < 10 ? "0\(v)" : "\(v)" }
    private static func three(_ v: Int64) -> String { v < 10 ? "00\(v)" : v < 100 ? "0\(v)" : "\(v)" }

    private static func snapshotRow(_ id: String, _ tag: String, _ size: String, _ date: String, _ clock: String, _ icount: String) -> String {
        func left(_ t: String, _ w: Int) -> String { t.count >= w ? t : t + String(repeating: " ", count: w - t.count) }
        func right(_ t: String, _ w: Int) -> String { t.count >= w ? t : String(repeating: " ", count: w - t.count) + t }
        return left(id, 9) + " " + left(tag, 17) + " " + right(size, 7) + right(date, 20) + right(clock, 13) + right(icount, 11) + "\n"
    }

    private static func localDate(_ seconds: Int64) -> String {
        var t = time_t(seconds)
        var tm = tm()
        localtime_r(&t, &tm)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%Y-%m-%d %H:%M:%S", &tm)
        return String(decoding: buf[0 ..< n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// qemu-img's human form of a structured value: `key: value`, dashes in keys as spaces,
    /// lists as `[i]:`, nested values four spaces further in.
    private static func humanFields(_ fields: [(String, InfoValue)], indent: Int) -> String {
        var s = ""
        for (k, v) in fields { s += humanValue(String(k.map { $0 == "-" ? " " : $0 }), v, indent: indent) }
        return s
    }

    private static func humanValue(_ label: String, _ v: InfoValue, indent: Int) -> String {
        let pad = String(repeating: " ", count: indent)
        switch v {
        case .string(let t): return "\(pad)\(label): \(t)\n"
        case .int(let i): return "\(pad)\(label): \(i)\n"
        case .bool(let b): return "\(pad)\(label): \(b)\n"
        case .list(let items):
            var s = "\(pad)\(label):\n"
            for (i, item) in items.enumerated() { s += humanValue("[\(i)]", item, indent: indent + 4) }
            return s
        case .object(let fields):
            return "\(pad)\(label):\n" + humanFields(fields, indent: indent + 4)
        }
    }

    /// qemu-img's pretty JSON of a value, continuing a line at `indent`.
    static func json(_ v: InfoValue, indent: Int) -> String {
        let pad = String(repeating: " ", count: indent + 4)
        let close = String(repeating: " ", count: indent)
        switch v {
        case .string(let t): return Format.jsonString(t)
        case .int(let i): return "\(i)"
        case .bool(let b): return b ? "true" : "false"
        case .list(let items):
            if items.isEmpty { return "[\n\(close)]" }
            return "[\n" + items.map { pad + json($0, indent: indent + 4) }.joined(separator: ",\n") + "\n\(close)]"
        case .object(let fields):
            if fields.isEmpty { return "{\n\(close)}" }
            return "{\n" + fields.map { "\(pad)\"\($0.0)\": " + json($0.1, indent: indent + 4) }.joined(separator: ",\n") + "\n\(close)}"
        }
    }

    /// The fields of `qemu-img info --output=json`, in qemu-img 7.2's order.
    static func infoValue(_ info: ImageInfo) -> InfoValue {
        var fields: [(String, InfoValue)] = []
        let d = info.details
        if let d, !d.snapshots.isEmpty {
            fields.append(("snapshots", .list(d.snapshots.map { sn in
                var o: [(String, InfoValue)] = []
                if let ic = sn.icount { o.append(("icount", .int(ic))) }
                o += [
                    ("vm-clock-nsec", .int(sn.vmClockNanoseconds % 1_000_000_000)),
                    ("name", .string(sn.name)),
                    ("date-sec", .int(sn.dateSeconds)),
                    ("date-nsec", .int(sn.dateNanoseconds)),
                    ("vm-clock-sec", .int(sn.vmClockNanoseconds / 1_000_000_000)),
                    ("id", .string(sn.id)),
                    ("vm-state-size", .int(sn.vmStateSize)),
                ]
                return .object(o)
            })))
        }
        if let f = d?.backingFormat, d?.backingFilename != nil { fields.append(("backing-filename-format", .string(f))) }
        fields.append(("virtual-size", .int(info.virtualSize)))
        fields.append(("filename", .string(info.filename)))
        if let cs = d?.clusterSize { fields.append(("cluster-size", .int(Int64(cs)))) }
        fields.append(("format", .string(info.format)))
        if let a = info.actualSize { fields.append(("actual-size", .int(a))) }
        if let fs = d?.formatSpecific { fields.append(("format-specific", fs)) }
        if let d, let b = d.backingFilename {
            if let full = d.fullBackingFilename { fields.append(("full-backing-filename", .string(full))) }
            fields.append(("backing-filename", .string(b)))
        }
        if d?.dirtyKnown ?? true { fields.append(("dirty-flag", .bool(info.dirtyFlag))) }
        return .object(fields)
    }

    /// `qemu-img info --output=json`: the same fields in the same order, four-space indent.
    static func infoJSON(_ info: ImageInfo) -> String {
        var value = infoValue(info)
        if let reasons = info.untrustedReasons, case .object(var fields) = value {
            fields.append(("untrusted", untrustedValue(reasons)))
            value = .object(fields)
        }
        return json(value, indent: 0) + "\n"
    }

    /// `--untrusted`'s verdict, for a gatekeeper script: `{"safe": B, "reasons": [...]}`.
    static func untrustedValue(_ reasons: [String]) -> InfoValue {
        .object([("safe", .bool(reasons.isEmpty)), ("reasons", .list(reasons.map { .string($0) }))])
    }

    /// The verdict in `info`'s human form: one line.
    static func untrustedHuman(_ reasons: [String]) -> String {
        reasons.isEmpty ? "untrusted: safe (self-contained)\n" : "untrusted: unsafe: \(reasons.joined(separator: "; "))\n"
    }

    /// `qemu-img info --backing-chain --output=json`: a list of the images, top first.
    static func infoChainJSON(_ chain: [ImageInfo]) -> String {
        json(.list(chain.map(infoValue)), indent: 0) + "\n"
    }

    /// `qemu-img info --backing-chain` (human): the images, top first, a blank line between.
    static func infoChainHuman(_ chain: [ImageInfo]) -> String {
        chain.map(infoHuman).joined(separator: "\n")
    }

    /// `qemu-img map --output=json`: one object per line, the list in `[` `]`.
    static func mapJSON(_ entries: [MapEntry]) -> String {
        // An empty image: qemu-img reports one empty, absent run rather than an empty list.
        if entries.isEmpty {
            return "[{ \"start\": 0, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false}]\n"
        }
        let lines = entries.map { e -> String in
            var s = "{ \"start\": \(e.start), \"length\": \(e.length), \"depth\": \(e.depth),"
            s += " \"present\": \(e.present), \"zero\": \(e.zero), \"data\": \(e.data)"
            if let o = e.offset { s += ", \"offset\": \(o)" }
            return s + "}"
        }
        return "[" + lines.joined(separator: ",\n") + "]\n"
    }

    /// `qemu-img map` (human): only the runs holding data, with where they live and in which
    /// file; neighbouring runs that continue each other in the same file are printed as one.
    /// Data with no place in a file (compressed clusters) cannot be shown: as qemu-img does,
    /// the runs before it are printed and an error follows.
    static func mapHuman(_ entries: [MapEntry], file: String) -> (text: String, error: FerryError?) {
        var s = Format.pad("Offset", 16) + Format.pad("Length", 16) + Format.pad("Mapped to", 16) + "File\n"
        var pending: (start: Int64, length: Int64, offset: Int64, file: String)?
        func emit() {
            guard let p = pending else { return }
            s += Format.pad(Format.hex(p.start), 16) + Format.pad(Format.hex(p.length), 16)
                + Format.pad(Format.hex(p.offset), 16) + p.file + "\n"
        }
        for e in entries where e.data && !e.zero {
            guard let offset = e.offset else {
                emit()
                return (s, FerryError(.notSupported, "the image contains compressed clusters, which have no place in a file to show; use --output=json", path: file, offset: e.start))
            }
            let name = e.file ?? file
            if let p = pending, p.start + p.length == e.start, p.offset + p.length == offset, p.file == name {
                pending!.length += e.length
            } else {
                emit()
                pending = (e.start, e.length, offset, name)
            }
        }
        emit()
        return (s, nil)
    }

    // MARK: - OVA

    /// What the manifest said of a member, for people.
    static func verdictHuman(_ v: OVAPackage.Verdict) -> String {
        switch v {
        case .matched(let a): return "matched (\(a.rawValue))"
        case .mismatch(let a, _, _): return "MISMATCH (\(a.rawValue))"
        case .noManifest: return "no manifest"
        case .notListed: return "not in manifest"
        case .isManifest: return "this is the manifest"
        }
    }

    /// `ferry info` of an OVA: the archive, then each member with its digest verdict and, for
    /// a disk, what `info` says of it (indented).
    static func archiveHuman(_ a: ArchiveInfo) -> String {
        var s = "archive: \(a.filename)\n"
        s += "file format: ova\n"
        s += "archive size: \(ByteSize.human(a.size)) (\(a.size) bytes)\n"
        s += "disk size: \(a.actualSize.map(ByteSize.human) ?? "unavailable")\n"
        s += "descriptor: \(a.descriptor ?? "none")\n"
        s += "manifest: \(a.manifest ?? "none")\n"
        s += "disks: \(a.members.filter { $0.disk != nil }.count)\n"
        s += "Members:\n"
        for (i, m) in a.members.enumerated() {
            s += "    [\(i)] \(m.name)\n"
            s += "        size: \(ByteSize.human(m.size)) (\(m.size) bytes) at offset \(m.offset)\n"
            if m.isFile {
                s += "        digest: \(verdictHuman(m.verdict))\n"
            } else {
                s += "        type: \(m.type)\n"
            }
            switch m.disk {
            case .success(let info)?:
                s += "        disk:\n"
                for line in infoHuman(info).split(separator: "\n", omittingEmptySubsequences: false) where !line.isEmpty {
                    s += "            \(line)\n"
                }
            case .failure(let e)?:
                s += "        disk: unreadable: \(e.message)\n"
            case nil:
                break
            }
        }
        for name in a.missing { s += "missing from the archive: \(name)\n" }
        return s
    }

    /// `ferry info --output=json` of an OVA, in the layout of qemu-img's JSON.
    static func archiveJSON(_ a: ArchiveInfo) -> String {
        var fields: [(String, InfoValue)] = [
            ("filename", .string(a.filename)),
            ("format", .string("ova")),
            ("size", .int(a.size)),
        ]
        if let actual = a.actualSize { fields.append(("actual-size", .int(actual))) }
        if let d = a.descriptor { fields.append(("descriptor", .string(d))) }
        if let m = a.manifest { fields.append(("manifest", .string(m))) }
        fields.append(("members", .list(a.members.map { m in
            var o: [(String, InfoValue)] = [
                ("name", .string(m.name)),
                ("offset", .int(m.offset)),
                ("size", .int(m.size)),
                ("type", .string(m.type)),
            ]
            if m.isFile {
                switch m.verdict {
                case .matched(let alg):
                    o += [("digest", .string("matched")), ("digest-algorithm", .string(alg.rawValue))]
                case .mismatch(let alg, let expected, let actual):
                    o += [("digest", .string("mismatch")), ("digest-algorithm", .string(alg.rawValue)),
                          ("expected-digest", .string(expected)), ("actual-digest", .string(actual))]
                case .noManifest: o.append(("digest", .string("no-manifest")))
                case .notListed: o.append(("digest", .string("not-listed")))
                case .isManifest: o.append(("digest", .string("manifest")))
                }
            }
            switch m.disk {
            case .success(let info)?: o.append(("disk", infoValue(info)))
            case .failure(let e)?: o.append(("disk-error", .string(e.message)))
            case nil: break
            }
            return .object(o)
        })))
        if !a.missing.isEmpty { fields.append(("missing", .list(a.missing.map { .string($0) }))) }
        return json(.object(fields), indent: 0) + "\n"
    }
}
