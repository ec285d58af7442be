import FerryCore
import FerryFormats

extension Images {
    /// `ferry amend -o` and `ferry rebase -u`: changes the header of the image at `spec` in
    /// place, as its format allows (`ImageFormat.amend`). A new backing file needs its format
    /// (as qemu-img 7.2 asks); "" removes the backing file.
    public static func amend(_ spec: ImageSpec, options: [String: String], backingFile: String? = nil,
                             backingFormat: String? = nil) async throws {
        try await changeInPlace(spec) { file, format in
            if let b = backingFile, !b.isEmpty, backingFormat == nil {
                throw FerryError(.invalidArgument, "Could not change the backing file to '\(b)': backing format must be specified")
            }
            if let backingFormat { _ = try Formats.lookup(backingFormat) }
            try await format.amend(ImageAmendment(location: spec.location, file: file.current, backingFile: backingFile,
                                                  backingFormat: backingFormat, options: options, setFileLength: file.setLength))
        }
    }
}

extension Images {
    /// `ferry snapshot -c NAME` / `-d SNAPSHOT`: creates or deletes an internal snapshot of
    /// the image at `spec`, in place, as its format allows (`ImageFormat.changeSnapshots`).
    public static func changeSnapshots(_ spec: ImageSpec, _ action: SnapshotChange.Action) async throws {
        try await changeInPlace(spec) { file, format in
            guard format.hasInternalSnapshots else {
                throw FerryError(.notSupported, "format \(format.name) does not support snapshots (formats that do: \(Formats.all.filter { $0.hasInternalSnapshots }.map { $0.name }.joined(separator: ", ")))", path: spec.location)
            }
            try await format.changeSnapshots(SnapshotChange(location: spec.location, file: file.current, action: action,
                                                            setFileLength: file.setLength))
        }
    }
}

extension Images {
    /// `ferry check [-r leaks|all]`: the image's format checks its metadata (`ImageFormat.check`),
    /// in place. After a repair that fixed something, the image is checked again, as qemu-img
    /// does: the second report is what the image is now.
    public static func check(_ spec: ImageSpec, repair: CheckRepair? = nil) async throws -> (first: CheckReport, after: CheckReport?, format: String) {
        let (checked, name) = try await changeInPlace(spec, readOnly: repair == nil) { file, format -> (CheckReport?, String) in
            guard format.hasCheck else { return (nil, format.name) }
            return (try await format.check(CheckRequest(location: spec.location, file: file.current, repair: repair,
                                                        openFile: { try await openEndpoint($0, readOnly: true) },
                                                        setFileLength: repair == nil ? nil : file.setLength)), format.name)
        }
        guard let report = checked else {
            // A format without a check still opens the image, as qemu-img does: a broken one
            // is reported as broken, not as unchecked.
            let image = try await open(ImageSpec(spec.location, format: name), readOnly: true)
            try await image.device.close()
            throw FerryError(.notSupported, "This image format does not support checks", path: spec.location)
        }
        guard repair != nil, report.failure == nil, report.leaksFixed + report.corruptionsFixed > 0 else { return (report, nil, name) }
        let again = try await changeInPlace(spec, readOnly: true) { file, format in
            try await format.check(CheckRequest(location: spec.location, file: file.current,
                                                openFile: { try await openEndpoint($0, readOnly: true) }))
        }
        return (report, again, name)
    }
}
