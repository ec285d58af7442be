import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

struct Amend: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "amend",
        abstract: "Change an image's options in place, as qemu-img amend does.",
        usage: "ferry amend [-f fmt] -o options [-q] <image>",
        discussion: """
        qcow2: lazy_refcounts=on|off, compat=0.10|1.1, refcount_bits (1 to 64, new refcount \
        structures written after the end of the file, then the header switched to them) and \
        data_file (the name of an image's external data file; '' drops it, as qemu-img) are \
        changed. A downgrade of an image with zero clusters, incompatible features, bitmaps \
        or refcount_bits other than 16 is refused, as is an upgrade of an image whose \
        snapshots lack extra data; backing_file and backing_fmt are accepted only with the \
        value the image has (the backing file is changed with 'ferry rebase'); size is \
        changed with 'ferry resize'. Other formats cannot be amended. Not supported: -p, -t, --force, --object, --image-opts.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Option(name: .customShort("o", allowingJoined: true),
            help: ArgumentHelp("Options to change, 'name=value,...'.", valueName: "options"))
    var options: [String] = []

    @Flag(name: .customShort("q"), help: "Quiet.")
    var quiet = false

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String?

    func execute() async throws -> Int32 {
        guard !options.isEmpty else { throw UsageError(message: "Must specify options (-o)", command: "amend") }
        guard let image else { throw UsageError(message: "Expecting one image file name", command: "amend") }
        try await Images.amend(ImageSpec(image, format: format), options: try Convert.parseOptions(options))
        return 0
    }
}
