import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

struct Measure: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "measure",
        abstract: "Show the file size a new image would need, as qemu-img measure does.",
        usage: "ferry measure [-O fmt] [-o options] [--output human|json] (--size N | [-f fmt] [-l snapshot] <image>)",
        discussion: """
        Prints the size the file of a new image made by 'convert -O fmt' from <image> (or, with \
        --size, an empty image of N bytes) would need, and its size fully allocated; for a \
        format with persistent bitmaps made from an image that can hold them, also what the \
        bitmaps would take. Formats that cannot say are refused, as qemu-img refuses them. \
        Not supported: --object, --image-opts, --target-image-opts.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Option(name: .customShort("O", allowingJoined: true),
            help: ArgumentHelp("Format of the new image (default: raw).", valueName: "fmt"))
    var targetFormat: String?

    @Option(name: .customShort("o", allowingJoined: true),
            help: ArgumentHelp("Creation options of the new image, 'name=value,...'; '-o help' lists them.", valueName: "options"))
    var targetOptions: [String] = []

    @Option(name: .customLong("size"), help: ArgumentHelp("Measure an empty image of this many bytes instead of an image.", valueName: "N"))
    var size: String?

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Option(name: .customShort("l", allowingJoined: true),
            help: ArgumentHelp("Measure this internal snapshot of the image: 'snapshot.id=ID,snapshot.name=NAME' or an ID or name.", valueName: "snapshot"))
    var snapshotParam: String?

    @Argument(help: ArgumentHelp("The image to measure.", valueName: "image"))
    var image: String?

    func execute() async throws -> Int32 {
        let target = targetFormat ?? Formats.fallback.name
        if targetOptions.contains(where: { $0 == "help" || $0 == "?" }) {
            Terminal.out(Convert.optionHelp(for: try Formats.lookup(target)))
            return 0
        }
        var bytes: Int64?
        if let size {
            guard let v = ByteSize.parse(size), v >= 0 else {
                throw FerryError(.invalidArgument, "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            }
            bytes = v
        }
        switch (image, bytes) {
        case (nil, nil): throw FerryError(.invalidArgument, "Either --size N or one filename must be specified.")
        case (.some, .some): throw FerryError(.invalidArgument, "--size N cannot be used together with a filename.")
        default: break
        }
        let options = try Convert.parseOptions(targetOptions)
        let snapshot = try Convert.snapshotSelector(l: snapshotParam, s: nil)
        let (m, probed, warnings) = try await Images.measure(
            source: image.map { ImageSpec($0, format: format, snapshot: snapshot) }, size: bytes, format: target, options: options)
        if probed, let image { warnProbedAsRaw(image) }
        for w in warnings { Terminal.warn(w) }
        Terminal.out(output == .json ? Self.json(m) : Self.human(m))
        return 0
    }

    static func human(_ m: SizeMeasurement) -> String {
        var s = "required size: \(m.required)\nfully allocated size: \(m.fullyAllocated)\n"
        if let b = m.bitmaps { s += "bitmaps size: \(b)\n" }
        return s
    }

    /// qemu-img 7.2 puts `bitmaps` first.
    static func json(_ m: SizeMeasurement) -> String {
        var fields: [(String, InfoValue)] = []
        if let b = m.bitmaps { fields.append(("bitmaps", .int(b))) }
        fields.append(("required", .int(m.required)))
        fields.append(("fully-allocated", .int(m.fullyAllocated)))
        return Report.json(.object(fields), indent: 0) + "\n"
    }
}
