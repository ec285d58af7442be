import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

struct Resize: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Change an image's virtual size in place, as qemu-img resize does.",
        usage: "ferry resize [-f fmt] [--shrink] [--preallocation=mode] [-q] <image> [+|-]<size>",
        discussion: """
        A size with + or - is added to or taken from the present size. Shrinking needs \
        --shrink and deletes what lies past the new end. Formats: \(Formats.all.filter { $0.resizable }.map { $0.name }.joined(separator: ", ")). \
        qcow2 images are resized with --preallocation=off, not with an external data file or \
        persistent bitmaps, and shrunk only without internal snapshots or extended L2 \
        entries. Not supported: --object, --image-opts, -U, other formats.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Flag(name: .customLong("shrink"), help: "Allow the image to become smaller (what lies past the new end is lost).")
    var shrink = false

    @Option(name: .customLong("preallocation"),
            help: ArgumentHelp("How the added part is allocated: off, falloc or full (raw); off (qcow2).", valueName: "mode"))
    var preallocation: String = "off"

    @Flag(name: .customShort("q"), help: "Quiet: no message on success.")
    var quiet = false

    /// The image and the size; taken unparsed so that a size such as -1G is not an option
    /// (as qemu-img, which reads a negative size last as the size).
    @Argument(parsing: .allUnrecognized,
              help: ArgumentHelp("The image, then the new size or +N / -N to add or take away (suffixes k, M, G, T, P, E).",
                                 valueName: "image> <size"))
    var operands: [String] = []

    static let shrinkWarning = "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."

    func execute() async throws -> Int32 {
        var given = operands
        if let dashes = given.firstIndex(of: "--") { given.remove(at: dashes) }
        if let option = given.dropLast().first(where: { $0.hasPrefix("-") }) {
            throw UsageError(message: "Unknown option '\(option)'", command: "resize")
        }
        guard given.count == 2 else { throw UsageError(message: "Expecting image file name and size", command: "resize") }
        let image = given[0], size = given[1]
        var text = Substring(size)
        var sign: Int64 = 0
        if text.first == "+" { sign = 1; text = text.dropFirst() } else if text.first == "-" { sign = -1; text = text.dropFirst() }
        guard let amount = ByteSize.parse(String(text)) else {
            throw FerryError(.invalidArgument, "Parameter 'size' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)")
        }
        guard ["off", "metadata", "falloc", "full"].contains(preallocation) else {
            throw FerryError(.invalidArgument, "Invalid parameter '\(preallocation)' (preallocation: off, metadata, falloc, full)")
        }
        let spec = ImageSpec(image, format: format)
        let (current, _, probed) = try await Images.describeSize(spec)
        if probed { warnProbedAsRaw(image) }
        let (target, overflow) = sign == 0 ? (amount, false) : current.addingReportingOverflow(sign * amount)
        guard !overflow, target > 0 else { throw FerryError(.invalidArgument, "New image size must be positive") }
        if target < current && !shrink {
            Terminal.complain("Use the --shrink option to perform a shrink operation.")
            Terminal.warn(Self.shrinkWarning)
            return 1
        }
        try await Images.resize(spec, to: target, preallocation: preallocation)
        if !quiet { Terminal.out("Image resized.\n") }
        return 0
    }
}
