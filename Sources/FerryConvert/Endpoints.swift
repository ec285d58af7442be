import FerryCore
import FerryFile
import FerryFormats
import FerryISCSI
import FerryNBD
import FerryRBD

/// Where images live: a local file or block device, or a network endpoint named by URL.
/// Every kind of storage is reached through these calls, so adding one means adding a case
/// here and nothing else in the copy path.
/// How endpoints are opened: the cache mode and the knobs of each kind of storage.
public struct EndpointOptions: Sendable {
    public var cache: CacheMode
    /// How local files issue I/O.
    public var fileEngine: FileDevice.IOEngine
    /// Connections (sessions) to open to a network server that allows several; nil for the
    /// endpoint's own default (`defaultConnections`, one session to read from iSCSI).
    public var connections: Int?
    /// Read-only local files: read with O_DIRECT when large and mostly not in the page cache
    /// (see `FileDevice.Options.directIfCold`), whatever `cache` says.
    public var directIfCold: Bool
    /// `-U`: open a local image even while another process (a running VM) holds it for
    /// writing; otherwise that is an error, as with qemu-img.
    public var forceShare: Bool
    /// `--untrusted`: the image came from a stranger. No backing file, external data file,
    /// extent or parent it names is opened, and a file two formats claim (or given as one
    /// format while its bytes say another) is refused.
    public var untrusted: Bool
    /// How network sessions ride out a server that hangs, drops the connection or fails a
    /// request (`--timeout`, `--reconnects`, `--retries`).
    public var resilience: Resilience
    /// `-o` options for the storage of a new image rather than its format (an RBD image's
    /// object size): see `Images.splitCreateOptions`.
    public var storage: [String: String] = [:]

    public init(cache: CacheMode = .writeback, fileEngine: FileDevice.IOEngine = .auto, connections: Int? = nil,
                directIfCold: Bool = false, forceShare: Bool = false, untrusted: Bool = false,
                resilience: Resilience = .standard) {
        self.cache = cache
        self.fileEngine = fileEngine
        self.connections = connections
        self.directIfCold = directIfCold
        self.forceShare = forceShare
        self.untrusted = untrusted
        self.resilience = resilience
    }

    /// Sessions per server when `connections` is not given.
    public static let defaultConnections = 4

    /// `connections`, or the default.
    var sessions: Int { connections ?? Self.defaultConnections }

    /// Local files written through the page cache and flushed at the end start write-back
    /// after each this many bytes (`FileDevice.Options.writeBehind`). On a virtio disk, raw ->
    /// qcow2 of 512 MiB of data took 0.86-0.89 of the time it took without (sets of 8 and 16
    /// interleaved runs; 16 to 256 MiB were alike within the noise).
    public static let writeBehind: Int64 = 64 << 20

    /// The file options for this cache mode.
    func fileOptions(readOnly: Bool) -> FileDevice.Options {
        FileDevice.Options(readOnly: readOnly, direct: cache.direct, sync: cache.sync, engine: fileEngine,
                           directIfCold: readOnly && directIfCold,
                           writeBehind: !readOnly && cache == .writeback ? Self.writeBehind : 0)
    }
}

extension Images {
    /// Opens the storage an image lives on: a local file or block device, or (by URL scheme)
    /// a network endpoint.
    public static func openEndpoint(_ location: String, readOnly: Bool,
                                    options: EndpointOptions = EndpointOptions()) async throws -> any BlockDevice {
        if NBDDevice.handles(location) {
            return try await NBDDevice.open(location, readOnly: readOnly, connections: options.sessions, resilience: options.resilience)
        }
        switch urlScheme(location) {
        case nil:
            break
        case "nfs":
            do {
                return try await openNFS(location, readOnly: readOnly, options: options)
            } catch let e as FerryError {
                // Perhaps a disk inside an OVA on the server: nfs://host/export/app.ova/disk1.vmdk
                // (libnfs then fails to mount app.ova as a directory, so any error may mean it).
                guard let (archive, member) = ArchiveLocation.splitURL(location) else { throw e }
                guard readOnly else { throw ArchiveLocation.refuseWrite(archive: archive, location: location) }
                guard let file = try? await openNFS(archive, readOnly: true, options: options) else { throw e }
                return try await ArchiveLocation.openMember(of: file, archive: archive, member: member, location: location)
            }
        case "iscsi":
            return try await openISCSI(location, readOnly: readOnly, options: options)
        case "rbd":
            return try await openRBD(location, readOnly: readOnly, options: options)
        case let scheme?:
            throw FerryError(.notSupported, "\(scheme):// URLs are not supported yet", path: location)
        }
        if let (archive, member) = ArchiveLocation.split(location) {
            return try await ArchiveLocation.openMember(archive: archive, member: member, location: location, readOnly: readOnly)
        }
        let file = try await FileDevice.open(path: location, options: options.fileOptions(readOnly: readOnly))
        if !options.forceShare && file.heldForWritingElsewhere {
            try? await file.close()
            throw FerryError(.busy, "another process (a running VM?) has the image open for writing, so it may change while it is read; use -U to \(readOnly ? "read" : "open") it anyway",
                             path: location)
        }
        return file
    }

    /// Makes the storage for a new image of `size` host bytes: a new sparse file, or an existing
    /// block device or network export at least that large.
    public static func createEndpoint(_ location: String, size: Int64,
                                      options: EndpointOptions = EndpointOptions()) async throws -> any BlockDevice {
        if NBDDevice.handles(location) {
            // An export cannot be created: open it for writing and check it is large enough.
            // A larger export is fine (the copy writes its first bytes).
            let device = try await NBDDevice.open(location, readOnly: false, connections: options.sessions, resilience: options.resilience)
            if device.size < size {
                try? await device.close()
                throw FerryError(.tooSmall, "the NBD export is too small: \(device.size) bytes, but \(size) are needed", path: location)
            }
            return device
        }
        switch urlScheme(location) {
        case nil:
            break
        case "nfs":
            do {
                return try await createNFS(location, size: size, options: options)
            } catch let e as FerryError {
                // Inside an OVA on the server: say so rather than libnfs's mount error.
                if let (archive, _) = ArchiveLocation.splitURL(location),
                   let file = try? await openNFS(archive, readOnly: true, options: options) {
                    try? await file.close()
                    throw ArchiveLocation.refuseWrite(archive: archive, location: location)
                }
                throw e
            }
        case "iscsi":
            return try await createISCSI(location, size: size, options: options)
        case "rbd":
            return try await createRBD(location, size: size, options: options)
        case let scheme?:
            throw FerryError(.notSupported, "\(scheme):// URLs are not supported yet", path: location)
        }
        if let (archive, _) = ArchiveLocation.split(location) {
            throw ArchiveLocation.refuseWrite(archive: archive, location: location)
        }
        return try await FileDevice.create(path: location, size: size, options: options.fileOptions(readOnly: false))
    }

    /// Starts loading, each on a thread of its own, the libraries of the network endpoints
    /// that `arguments` name (a whole command line will do: only URLs an endpoint handles
    /// count), so they load while the command parses its arguments and opens the rest.
    /// Returns the kinds of endpoint it started loading for.
    @discardableResult
    public static func preloadLibraries(for arguments: [String]) -> [String] {
        var started: [String] = []
        for a in arguments {
            if NBDDevice.handles(a) {
                if NBDDevice.preloading.start() { started.append("NBD") }
                continue
            }
            switch urlScheme(a) {
            case "iscsi": if ISCSIDevice.preloading.start() { started.append("iSCSI") }
            case "rbd": if RBDDevice.preloading.start() { started.append("RBD") }
            default: break
            }
        }
        return started
    }

    /// The scheme of a URL location (`nbd`, `nbd+unix`, `nfs`, `iscsi`, and `rbd` for qemu's
    /// `rbd:POOL/IMAGE`, which has no `//`), or nil for a path.
    static func urlScheme(_ location: String) -> String? {
        if RBDDevice.handles(location) { return "rbd" }
        let chars = Array(location.utf8)
        guard let colon = chars.firstIndex(of: UInt8(ascii: ":")), colon > 0,
              chars.count >= colon + 3, chars[colon + 1] == UInt8(ascii: "/"), chars[colon + 2] == UInt8(ascii: "/") else { return nil }
        let scheme = chars[0 ..< colon]
        let allowed: (UInt8) -> Bool = { c in
            (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) || c == 0x2b || c == 0x2d || c == 0x2e
        }
        guard scheme.allSatisfy(allowed) else { return nil }
        return String(decoding: scheme, as: UTF8.self)
    }
}
