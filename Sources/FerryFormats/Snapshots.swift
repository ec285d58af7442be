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

/// A change to an image's internal snapshots (`snapshot -c` / `-d`).
public struct SnapshotChange: Sendable {
    public enum Action: Sendable, Equatable {
        /// Creates a snapshot of the active layer with this name.
        case create(String)
        /// Deletes the (first) snapshot with this name.
        case delete(String)
        /// Reverts the active layer to the snapshot with this ID, or else this name.
        case apply(String)
    }
    public var location: String
    /// The image's file, opened for writing.
    public var file: any BlockDevice
    public var action: Action
    /// As `ResizeRequest.setFileLength`.
    public var setFileLength: @Sendable (_ length: Int64) async throws -> any BlockDevice

    public init(location: String, file: any BlockDevice, action: Action,
                setFileLength: @escaping @Sendable (_ length: Int64) async throws -> any BlockDevice) {
        self.location = location
        self.file = file
        self.action = action
        self.setFileLength = setFileLength
    }
}

extension ImageFormat {
    /// By default a format has no snapshots to change.
    public static func changeSnapshots(_ change: SnapshotChange) async throws {
        throw FerryError(.notSupported, "format \(name) does not support snapshots", path: change.location)
    }
}
