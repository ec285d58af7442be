import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

struct Snapshot: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "List, create, apply or delete an image's internal snapshots, as qemu-img snapshot does.",
        usage: "ferry snapshot [-f fmt] [-q] (-l | -c name | -a snapshot | -d snapshot) <image>",
        discussion: """
        Formats with internal snapshots: \(Formats.all.filter { $0.hasInternalSnapshots }.map { $0.name }.joined(separator: ", ")); \
        an image of another format has none to list. 'ferry convert -l' or '-s' copies a \
        snapshot. -d deletes by name, as qemu-img 7.2. Refused: -c and -a on qcow2 images \
        with persistent bitmaps, any change to one with an external data file, -a of a \
        snapshot whose L1 table is larger than the image's. Not supported: --object, \
        --image-opts, -U.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Flag(name: .customShort("l"), help: "List the snapshots.")
    var list = false

    @Option(name: .customShort("c", allowingJoined: true), help: ArgumentHelp("Create a snapshot of this name (its ID is one more than the largest).", valueName: "snapshot"))
    var create: String?

    @Option(name: .customShort("a", allowingJoined: true), help: ArgumentHelp("Revert the image to the snapshot with this ID, or else this name.", valueName: "snapshot"))
    var apply: String?

    @Option(name: .customShort("d", allowingJoined: true), help: ArgumentHelp("Delete the snapshot with this name.", valueName: "snapshot"))
    var delete: String?

    @Flag(name: .customShort("q"), help: "Quiet.")
    var quiet = false

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String?

    func execute() async throws -> Int32 {
        let actions = [list ? "-l" : nil, create.map { _ in "-c" }, apply.map { _ in "-a" }, delete.map { _ in "-d" }].compactMap { $0 }
        guard actions.count == 1 else {
            throw UsageError(message: actions.isEmpty ? "expecting one of -l, -c, -a, -d" : "Cannot mix '\(actions[0])' and '\(actions[1])'", command: "snapshot")
        }
        guard let image else { throw UsageError(message: "Expecting one image file name", command: "snapshot") }
        if let create {
            try await Images.changeSnapshots(ImageSpec(image, format: format), .create(create))
            return 0
        }
        if let apply {
            try await Images.changeSnapshots(ImageSpec(image, format: format), .apply(apply))
            return 0
        }
        if let delete {
            try await Images.changeSnapshots(ImageSpec(image, format: format), .delete(delete))
            return 0
        }
        let (chain, probed, warnings) = try await Images.info(ImageSpec(image, format: format))
        if probed { warnProbedAsRaw(image) }
        for w in warnings { Terminal.warn(w) }
        if let snapshots = chain.first?.details?.snapshots, !snapshots.isEmpty {
            Terminal.out(Report.snapshotList(snapshots))
        }
        return 0
    }
}
