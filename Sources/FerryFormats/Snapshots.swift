import FerryCore

/// Which internal snapshot to read instead of the image's active layer (`convert -l` / `-s`).
public struct SnapshotSelector: Sendable, Equatable, CustomStringConvertible {
    /// `snapshot.id=`: the snapshot's ID must be this.
    public var id: String?
    /// `snapshot.name=`: the snapshot's name must be this.
    public var name: String?
    /// `-s X` or `-l X`: the snapshot whose ID is X, or else the one whose name is X.
    public var idOrName: String?

    public init(id: String? = nil, name: String? = nil, idOrName: String? = nil) {
        self.id = id
        self.name = name
        self.idOrName = idOrName
    }

    /// The snapshot of `list` this selects, or nil.
    public func pick(_ list: [QCOW2Snapshot]) -> QCOW2Snapshot? {
        if let x = idOrName { return list.first { $0.id == x } ?? list.first { $0.name == x } }
        return list.first { s in (id == nil || s.id == id) && (name == nil || s.name == name) }
    }

    public var description: String {
        if let x = idOrName { return "'\(x)'" }
        return [id.map { "id '\($0)'" }, name.map { "name '\($0)'" }].compactMap { $0 }.joined(separator: " and ")
    }
}

extension ImageFormat {
    /// By default a format has no internal snapshots.
    public static var hasInternalSnapshots: Bool { false }
}
