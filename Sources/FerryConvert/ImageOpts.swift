import FerryCore
import FerryFormats

/// qemu's `--image-opts` form of an image, `driver=qcow2,file.driver=nbd,file.server.type=unix,...`,
/// turned into the location and format Ferry opens.
///
/// `driver` is a format (its storage then under `file.`) or a protocol (the image is raw):
/// `file`/`host_device` (`filename`), `nbd` (`server.type` inet or unix, `server.host`,
/// `server.port`, `server.path`, `export`; or `host`, `port`, `path`), `nfs` (`server.host`,
/// `path`) and `iscsi` (`portal`, `target`, `lun`, `transport=tcp`). A `filename` may itself
/// be a URL. Any other option is refused by name rather than ignored.
public enum ImageOpts {
    public static func parse(_ text: String) throws -> ImageSpec {
        var opts = try split(text)
        guard let driver = opts.removeValue(forKey: "driver") else {
            throw FerryError(.invalidArgument, "--image-opts '\(text)' names no driver (e.g. driver=qcow2,file.filename=disk.qcow2)")
        }
        let format: String?
        var storage: [String: String]
        if Formats.named(driver) != nil {
            format = driver
            storage = [:]
            for (k, v) in opts {
                guard k.hasPrefix("file.") else { throw unsupported(k, text) }
                storage[String(k.dropFirst(5))] = v
            }
            // `driver=qcow2,file.filename=x`: the storage's driver defaults to a file.
            if storage["driver"] == nil { storage["driver"] = "file" }
        } else {
            format = Formats.fallback.name
            storage = opts
            storage["driver"] = driver
        }
        return ImageSpec(try location(storage, text), format: format)
    }

    /// The location of the storage options (`driver` included).
    static func location(_ options: [String: String], _ text: String) throws -> String {
        var o = options
        let driver = o.removeValue(forKey: "driver") ?? "file"
        func take(_ k: String) -> String? { o.removeValue(forKey: k) }
        let location: String
        switch driver {
        case "file", "host_device", "host_cdrom":
            guard let f = take("filename") else { throw missing("filename", text) }
            location = f
        case "nbd":
            let export = take("export") ?? ""
            let type = take("server.type") ?? (o["path"] != nil ? "unix" : "inet")
            if type == "unix" {
                guard let p = take("server.path") ?? take("path") else { throw missing("server.path", text) }
                location = "nbd+unix:///\(export)?socket=\(p)"
            } else if type == "inet" {
                guard let h = take("server.host") ?? take("host") else { throw missing("server.host", text) }
                let port = take("server.port") ?? take("port") ?? "10809"
                location = "nbd://\(h.contains(":") ? "[\(h)]" : h):\(port)/\(export)"
            } else {
                throw FerryError(.notSupported, "--image-opts: nbd server.type '\(type)' is not supported (inet, unix)")
            }
        case "nfs":
            if let t = take("server.type"), t != "inet" {
                throw FerryError(.notSupported, "--image-opts: nfs server.type '\(t)' is not supported (inet)")
            }
            guard let h = take("server.host") else { throw missing("server.host", text) }
            guard let p = take("path") else { throw missing("path", text) }
            location = "nfs://\(h)\(p.hasPrefix("/") ? "" : "/")\(p)"
        case "iscsi":
            if let t = take("transport"), t != "tcp" {
                throw FerryError(.notSupported, "--image-opts: iscsi transport '\(t)' is not supported (tcp)")
            }
            guard let portal = take("portal") else { throw missing("portal", text) }
            guard let target = take("target") else { throw missing("target", text) }
            location = "iscsi://\(portal)/\(target)/\(take("lun") ?? "0")"
        default:
            throw FerryError(.notSupported, "--image-opts: driver '\(driver)' is not supported (formats: \(Formats.all.map { $0.name }.joined(separator: ", ")); storage: file, host_device, nbd, nfs, iscsi)")
        }
        if let k = o.keys.sorted().first { throw unsupported(k, text) }
        return location
    }

    /// `a=b,c=d` with `,,` for a comma inside a value, as qemu's option strings.
    static func split(_ text: String) throws -> [String: String] {
        var result: [String: String] = [:]
        var parts: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { current.append(","); chars.removeFirst(); continue }
                parts.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        parts.append(current)
        for part in parts where !part.isEmpty {
            guard let eq = part.firstIndex(of: "=") else {
                throw FerryError(.invalidArgument, "--image-opts '\(text)': '\(part)' is not name=value")
            }
            let key = String(part[..<eq])
            guard result[key] == nil else {
                throw FerryError(.invalidArgument, "--image-opts '\(text)': option '\(key)' given twice")
            }
            result[key] = String(part[part.index(after: eq)...])
        }
        return result
    }

    private static func missing(_ key: String, _ text: String) -> FerryError {
        FerryError(.invalidArgument, "--image-opts '\(text)' needs \(key)")
    }

    private static func unsupported(_ key: String, _ text: String) -> FerryError {
        FerryError(.notSupported, "--image-opts '\(text)': option '\(key)' is not supported")
    }
}
