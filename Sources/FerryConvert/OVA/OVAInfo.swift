import FerryCore
import FerryFile
import FerryFormats

/// What `ferry info` shows of an OVA: its members, which of them are disks (with what
/// `info` says of each), and the manifest's verdict on each.
public struct ArchiveInfo: Sendable {
    public struct Member: Sendable {
        public var name: String
        public var offset: Int64
        public var size: Int64
        public var isFile: Bool
        /// `file`, `directory`, `link` or `other`.
        public var type: String
        public var verdict: OVAPackage.Verdict
        /// For a disk: what `info` says of it, or why it could not be read.
        public var disk: Result<ImageInfo, FerryError>?
    }
    public var filename: String
    public var size: Int64
    public var actualSize: Int64?
    public var descriptor: String?
    public var manifest: String?
    public var members: [Member]
    /// Names the manifest lists that the archive lacks.
    public var missing: [String]

    /// The one-line errors `info` ends with: digest mismatches, missing files, unreadable disks.
    public var errors: [FerryError] {
        var out: [FerryError] = []
        for m in members {
            if case .mismatch(let a, let expected, let actual) = m.verdict {
                out.append(FerryError(.corrupt, "\(a.rawValue) digest of '\(m.name)' does not match the manifest '\(manifest ?? "")' (expected \(expected), got \(actual))",
                                      path: filename, offset: m.offset))
            }
            if case .failure(let e)? = m.disk { out.append(e) }
        }
        for name in missing {
            out.append(FerryError(.corrupt, "the manifest '\(manifest ?? "")' lists '\(name)', which is not in the archive", path: filename))
        }
        return out
    }
}

extension Images {
    /// Describes the OVA (or tar archive) at `location` (a path or nfs:// URL), hashing every
    /// member the manifest lists.
    public static func describeArchive(_ location: String) async throws -> ArchiveInfo {
        let file = try await ArchiveLocation.openArchive(location)
        do {
            let package = try await OVAPackage.read(file)
            let disks = Set(try await package.diskMembers(in: file).map(\.name))
            var members: [ArchiveInfo.Member] = []
            for m in package.archive.members {
                let isFile = m.kind == .file
                var member = ArchiveInfo.Member(name: m.name, offset: m.dataOffset, size: m.size, isFile: isFile, type: m.typeName,
                                                verdict: isFile ? try await package.verify(m, in: file) : .notListed)
                if disks.contains(m.name) {
                    do {
                        var info = try await Images.info(ImageSpec(ArchiveLocation.memberLocation(location, m.name))).chain[0]
                        info.actualSize = m.size
                        member.disk = .success(info)
                    } catch let e as FerryError {
                        member.disk = .failure(e)
                    }
                }
                members.append(member)
            }
            let present = Set(package.archive.members.map(\.name))
            let local = Images.urlScheme(location) == nil
            let result = ArchiveInfo(filename: location, size: file.size, actualSize: local ? try? FileDevice.allocatedSize(path: location) : nil,
                                     descriptor: package.descriptor?.name, manifest: package.manifest?.name, members: members,
                                     missing: package.digests.map(\.name).filter { !present.contains($0) })
            try await file.close()
            return result
        } catch {
            try? await file.close()
            throw error
        }
    }

    /// The error for an archive given where an image is expected: which disks to name instead.
    static func archiveGivenAsImage(_ location: String) async -> FerryError {
        var disks: [String] = []
        do {
            let file = try await ArchiveLocation.openArchive(location)
            do {
                disks = try await OVAPackage.read(file).diskMembers(in: file).map(\.name)
            } catch {
                try? await file.close()
                throw error
            }
            try? await file.close()
        } catch let e as FerryError {
            // A damaged archive: say what is wrong with it.
            return e
        } catch {
            return FerryError(.io, "\(error)", path: location)
        }
        let example = disks.first ?? "disk1.vmdk"
        return FerryError(.invalidArgument, "this is an OVA (tar) archive, not a disk image; name a disk inside it, as '\(ArchiveLocation.memberLocation(location, example))' (disks: \(disks.isEmpty ? "none found" : disks.joined(separator: ", ")))",
                          path: location)
    }
}

/// The manifest check of a source that is a member of an OVA: the member is hashed front to
/// back in its own task while the copy runs, so that checking costs no extra wall time
/// unless hashing is the slower of the two.
final class MemberDigestCheck: Sendable {
    private let tasks: [(location: String, task: Task<OVAPackage.Verdict, any Error>)]
    let archives: [String: String]

    private init(_ tasks: [(String, Task<OVAPackage.Verdict, any Error>)], archives: [String: String]) {
        self.tasks = tasks.map { (location: $0.0, task: $0.1) }
        self.archives = archives
    }

    /// Starts a check for every source opened from inside an archive.
    static func start(for sources: [OpenedImage]) -> MemberDigestCheck {
        var tasks: [(String, Task<OVAPackage.Verdict, any Error>)] = []
        var archives: [String: String] = [:]
        for image in sources {
            guard let slice = image.file as? SliceDevice else { continue }
            archives[image.location] = slice.base.name
            let base = slice.base
            let start = slice.start
            tasks.append((image.location, Task {
                let package = try await OVAPackage.read(base)
                // The member whose data the slice is (its name may have been written another way).
                guard let m = package.archive.members.first(where: { $0.kind == .file && $0.dataOffset == start }) else {
                    return .notListed
                }
                return try await package.verify(m, in: base)
            }))
        }
        return MemberDigestCheck(tasks, archives: archives)
    }

    func cancel() async {
        for t in tasks {
            t.task.cancel()
            _ = await t.task.result
        }
    }

    /// Waits for the checks; throws at the first mismatch, else returns one note per source.
    func finish() async throws -> [String] {
        var notes: [String] = []
        for t in tasks {
            let verdict: OVAPackage.Verdict
            do {
                verdict = try await t.task.value
            } catch let e as FerryError {
                await cancel()
                throw e
            }
            switch verdict {
            case .matched(let a):
                notes.append("\(t.location): \(a.rawValue) digest matches the manifest")
            case .mismatch(let a, let expected, let actual):
                await cancel()
                throw FerryError(.corrupt, "\(a.rawValue) digest does not match the manifest of '\(archives[t.location] ?? "")' (expected \(expected), got \(actual))",
                                 path: t.location)
            case .noManifest:
                notes.append("\(t.location): the archive has no manifest; the disk was not verified")
            case .notListed, .isManifest:
                notes.append("\(t.location): the manifest does not list this disk; it was not verified")
            }
        }
        return notes
    }
}
