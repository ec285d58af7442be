import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

struct Rebase: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebase",
        abstract: "Change an overlay's backing file, as qemu-img rebase does.",
        usage: "ferry rebase [-u] [-f fmt] [-b backing [-F backing_fmt]] [-q] <image>",
        discussion: """
        Safe mode (without -u): every cluster the image leaves to its backing file is read \
        from the old and the new backing file, many at a time, and where they differ the old \
        contents are written into the image, so that it reads the same afterwards; -b "" \
        copies everything the old backing file gives (flattens). Then the header names the \
        new backing file. qcow2 images only, without internal snapshots, extended L2 entries \
        or an external data file. With -u only the header changes: the image then reads \
        through the new backing file; no -b leaves it with none. Not supported: -p, -t, -T, \
        --object, --image-opts, -U, -c.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Flag(name: .customShort("u"), help: "Unsafe: only rewrite the backing file name and format in the header.")
    var unsafeMode = false

    @Option(name: .customShort("b", allowingJoined: true),
            help: ArgumentHelp("The new backing file, as it is to be written in the header (\"\" for none).", valueName: "backing"))
    var backingFile: String?

    @Option(name: .customShort("F", allowingJoined: true),
            help: ArgumentHelp("Format of the new backing file (needed with -b).", valueName: "fmt"))
    var backingFormat: String?

    @Flag(name: .customShort("q"), help: "Quiet.")
    var quiet = false

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String?

    func execute() async throws -> Int32 {
        guard let image else { throw UsageError(message: "Expecting one image file name", command: "rebase") }
        guard unsafeMode else {
            guard let backingFile else { throw UsageError(message: "Must specify backing file (-b) or use unsafe mode (-u)", command: "rebase") }
            let spec = ImageSpec(image, format: format)
            _ = try await SignalCancellation.run {
                try await Images.rebase(spec, backingFile: backingFile, backingFormat: backingFile.isEmpty ? nil : backingFormat)
            }
            return 0
        }
        try await Images.amend(ImageSpec(image, format: format), options: [:], backingFile: backingFile ?? "",
                               backingFormat: backingFile?.isEmpty == false ? backingFormat : nil)
        return 0
    }
}
