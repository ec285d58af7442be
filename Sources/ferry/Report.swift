import FerryConvert
import FerryCore

/// The text `ferry info` and `ferry map` print, laid out as qemu-img 7.2 lays it out so that
/// scripts written against qemu-img keep working.
enum Report {
    /// `qemu-img info` (human).
    static func infoHuman(_ info: ImageInfo) -> String {
        var s = "image: \(info.filename)\n"
        s += "file format: \(info.format)\n"
        s += "virtual size: \(ByteSize.human(info.virtualSize)) (\(info.virtualSize) bytes)\n"
        s += "disk size: \(info.actualSize.map(ByteSize.human) ?? "unavailable")\n"
        if info.dirtyFlag { s += "cleanly shut down: no\n" }
        return s
    }

    /// `qemu-img info --output=json`: the same fields in the same order, four-space indent.
    static func infoJSON(_ info: ImageInfo) -> String {
        var fields: [(String, String)] = [
            ("virtual-size", "\(info.virtualSize)"),
            ("filename", Format.jsonString(info.filename)),
            ("format", Format.jsonString(info.format)),
        ]
        if let a = info.actualSize { fields.append(("actual-size", "\(a)")) }
        fields.append(("dirty-flag", info.dirtyFlag ? "true" : "false"))
        return "{\n" + fields.map { "    \"\($0.0)\": \($0.1)" }.joined(separator: ",\n") + "\n}\n"
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

    /// `qemu-img map` (human): only the runs holding data, with where they live in `file`;
    /// neighbouring runs that continue each other in the file are printed as one.
    static func mapHuman(_ entries: [MapEntry], file: String) -> String {
        var s = Format.pad("Offset", 16) + Format.pad("Length", 16) + Format.pad("Mapped to", 16) + "File\n"
        var pending: (start: Int64, length: Int64, offset: Int64)?
        func emit() {
            guard let p = pending else { return }
            s += Format.pad(Format.hex(p.start), 16) + Format.pad(Format.hex(p.length), 16)
                + Format.pad(Format.hex(p.offset), 16) + file + "\n"
        }
        for e in entries where e.data && !e.zero {
            guard let offset = e.offset else { continue }
            if let p = pending, p.start + p.length == e.start, p.offset + p.length == offset {
                pending!.length += e.length
            } else {
                emit()
                pending = (e.start, e.length, offset)
            }
        }
        emit()
        return s
    }
}
