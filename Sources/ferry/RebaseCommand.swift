import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

struct Rebase: FerryCommand {
    static let configuration = CommandConfiguration(
        abstract: "Change an overlay's backing file in its header, as qemu-img rebase -u does.",
        usage: "ferry rebase -u [-f fmt] [-b backing -F backing_fmt] [-q] <image>",
        discussion: """
        With -u only the header changes: the image then reads through the new backing file \
        (which should hold what the old one held); -b "" or no -b leaves it with none. \
        Not supported yet, and refused: the safe mode (without -u), which copies what differs \
        between the old and the new backing file into the image; -p, -t, -T, --object, \
        --image-opts, -U, -c.
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
            if backingFile == nil { throw UsageError(message: "Must specify backing file (-b) or use unsafe mode (-u)", command: "rebase") }
            throw FerryError(.notSupported, "ferry rebase works only with -u yet (the safe mode, which copies what differs between the backing files, is not supported; use qemu-img rebase)", path: image)
        }
        try await Images.amend(ImageSpec(image, format: format), options: [:], backingFile: backingFile ?? "",
                               backingFormat: backingFile?.isEmpty == false ? backingFormat : nil)
        return 0
    }
}
