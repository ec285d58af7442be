import FerryCore

/// An image in a Ceph cluster named as qemu names it:
///
///     rbd:POOL/IMAGE[@SNAP][:KEY=VALUE]...
///     rbd:POOL/NAMESPACE/IMAGE[@SNAP][:KEY=VALUE]...
///
/// A backslash takes the next character as it is (`\:`, `\@`, `\/`, `\\`). Keys: `conf` (a
/// ceph.conf to read instead of the default search path), `id` (the client, `admin` by
/// default), and any Ceph option (`keyring`, `mon_host`, `key`, ...), which is set as given.
/// qemu's `auth_supported` is taken too (as `auth_client_required`, with `;` between methods).
public struct RBDLocation: Sendable, Equatable {
    public var pool: String
    public var namespace: String?
    public var image: String
    public var snapshot: String?
    /// The `conf` key: a configuration file, or nil for Ceph's default search.
    public var conf: String?
    /// The `id` key: the client name without `client.`.
    public var id: String?
    /// Every other key, in the order given: set on the cluster handle before it connects.
    public var settings: [(key: String, value: String)]

    /// True if `location` names an RBD image (it starts with `rbd:`).
    public static func handles(_ location: String) -> Bool { location.hasPrefix("rbd:") }

    public init(parsing location: String) throws {
        guard Self.handles(location) else {
            throw FerryError(.invalidArgument, "not an RBD location (expected rbd:POOL/IMAGE)", path: location)
        }
        func bad(_ why: String) -> FerryError {
            FerryError(.invalidArgument, "\(why) (expected rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:KEY=VALUE...])", path: location)
        }
        // Split on unescaped ':' first, then the image part on unescaped '/' and '@'.
        let fields = try Self.split(Substring(location.dropFirst(4)), on: ":", location: location)
        let spec = fields[0]
        let parts = try Self.split(spec.raw, on: "/", location: location)
        guard parts.count == 2 || parts.count == 3 else {
            throw bad(parts.count < 2 ? "no pool or no image named" : "too many '/'")
        }
        pool = parts[0].text
        namespace = parts.count == 3 ? parts[1].text : nil
        let last = try Self.split(parts[parts.count - 1].raw, on: "@", location: location)
        guard last.count <= 2 else { throw bad("more than one '@'") }
        image = last[0].text
        snapshot = last.count == 2 ? last[1].text : nil
        guard !pool.isEmpty else { throw bad("empty pool name") }
        guard !image.isEmpty else { throw bad("empty image name") }
        if namespace?.isEmpty == true { throw bad("empty namespace") }
        if snapshot?.isEmpty == true { throw bad("empty snapshot name") }
        settings = []
        for field in fields.dropFirst() {
            let kv = try Self.split(field.raw, on: "=", location: location)
            guard kv.count >= 2, !kv[0].text.isEmpty else { throw bad("'\(field.text)' is not KEY=VALUE") }
            let key = kv[0].text
            // A value may hold '=' itself (a base64 key does).
            let value = kv.dropFirst().map(\.text).joined(separator: "=")
            switch key {
            case "conf": conf = value
            case "id": id = value
            case "auth_supported": settings.append(("auth_client_required", String(value.map { $0 == ";" ? "," : $0 })))
            default: settings.append((key, value))
            }
        }
    }

    public static func == (a: RBDLocation, b: RBDLocation) -> Bool {
        a.pool == b.pool && a.namespace == b.namespace && a.image == b.image && a.snapshot == b.snapshot
            && a.conf == b.conf && a.id == b.id && a.settings.elementsEqual(b.settings, by: { $0 == $1 })
    }

    /// `POOL[/NAMESPACE]/IMAGE[@SNAP]`, as `rbd` prints it: for messages.
    public var spec: String {
        [pool, namespace, image].compactMap { $0 }.joined(separator: "/") + (snapshot.map { "@" + $0 } ?? "")
    }

    /// A piece of the location: as written (escapes kept, for splitting further) and unescaped.
    struct Piece {
        var raw: Substring
        var text: String
    }

    static func split(_ s: Substring, on separator: Character, location: String) throws -> [Piece] {
        var pieces: [Piece] = []
        var start = s.startIndex
        var text = ""
        var i = s.startIndex
        while i < s.endIndex {
            let c = s[i]
            if c == "\\" {
                let next = s.index(after: i)
                guard next < s.endIndex else {
                    throw FerryError(.invalidArgument, "a '\\' at the end escapes nothing", path: location)
                }
                text.append(s[next])
                i = s.index(after: next)
                continue
            }
            if c == separator {
                pieces.append(Piece(raw: s[start ..< i], text: text))
                text = ""
                start = s.index(after: i)
            } else {
                text.append(c)
            }
            i = s.index(after: i)
        }
        pieces.append(Piece(raw: s[start ..< s.endIndex], text: text))
        return pieces
    }
}
