#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

let ferryVersion = "0.1.0"

/// A subcommand's work, run by `main.swift` after parsing (so that every error, from parsing
/// or from the work, is reported the same way).
protocol FerryCommand: ParsableCommand {
    /// Does the work; returns the exit status.
    func execute() async throws -> Int32
}

/// A mistake in the command line found after parsing: reported like a parse error, with a
/// pointer to `--help`.
struct UsageError: Error {
    var message: String
    var command: String
}

struct Ferry: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ferry",
        abstract: "Convert disk images with many requests in flight.",
        discussion: "Flags follow qemu-img's. Run 'ferry COMMAND --help' for a command's options.",
        version: "ferry version \(ferryVersion)",
        subcommands: [Convert.self, Create.self, Info.self, Map.self, Compare.self])
}

// MARK: - convert

struct Convert: FerryCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy one or more images into a new or existing image.",
        usage: "ferry convert [<options>] <src> ... <dst>",
        discussion: """
        Several sources are copied back to back into <dst>. Zero runs are detected and left \
        unwritten (sparse), and the target is flushed before ferry reports success unless \
        '-t unsafe' is given. A target that ferry created is removed if the copy fails. \
        A disk inside an OVA is read in place as X.ova/DISK and checked against the OVA's manifest.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the sources (probed if omitted).", valueName: "fmt"))
    var sourceFormat: String?

    @Option(name: .customShort("O", allowingJoined: true),
            help: ArgumentHelp("Format of the target (default: raw).", valueName: "fmt"))
    var targetFormat: String?

    @Option(name: .customShort("o", allowingJoined: true),
            help: ArgumentHelp("Target creation options, 'name=value,...'; '-o help' lists them.", valueName: "options"))
    var targetOptions: [String] = []

    @Flag(name: .customShort("c"), help: "Compress the target's clusters (\(Formats.able(.compression)); '-o help' lists a format's compression options).")
    var compress = false

    @Option(name: .customShort("B", allowingJoined: true),
            help: ArgumentHelp("Make the target an overlay of this image (\(Formats.able(.backingFile))): only what the source holds above it is written.", valueName: "backing"))
    var backingFile: String?

    @Option(name: .customShort("F", allowingJoined: true),
            help: ArgumentHelp("Format of the -B image (probed if omitted).", valueName: "fmt"))
    var backingFormat: String?

    @Option(name: .customShort("m", allowingJoined: true),
            help: ArgumentHelp("Requests in flight, 1 to \(ConvertOptions.maxWorkers) (default: 8).", valueName: "n"))
    var workers: Int?

    @Flag(name: .customShort("W"), help: "Allow writes to complete out of order.")
    var outOfOrder = false

    @Option(name: .customShort("S", allowingJoined: true),
            help: ArgumentHelp("Minimum run of zeros left unwritten, e.g. 4k or 64k; 0 writes every byte (default: 4k).", valueName: "size"))
    var sparseSize: String?

    @Flag(name: .customShort("n"), help: "The target exists already; don't create it.")
    var noCreate = false

    @Flag(name: .customLong("target-is-zero"), help: "With -n: the target reads as zeros already, so zero runs are skipped.")
    var targetIsZero = false

    @Option(name: .customShort("t", allowingJoined: true),
            help: ArgumentHelp("Target cache mode: none, writeback, unsafe, writethrough, directsync (default: writeback).", valueName: "cache"))
    var targetCache: String?

    @Option(name: .customShort("T", allowingJoined: true),
            help: ArgumentHelp("Source cache mode (same values; default: writeback, but a large local file mostly not in the page cache is read with O_DIRECT).", valueName: "cache"))
    var sourceCache: String?

    @Option(name: .customLong("buffer-size"),
            help: ArgumentHelp("Largest single read or write, a multiple of 4k (default: 2M).", valueName: "size"))
    var bufferSize: String?

    @Option(name: .customLong("connections"),
            help: ArgumentHelp("Connections to a network server that allows several, 1 to \(ConvertOptions.maxConnections) (default: 4, and 1 to read from iSCSI).", valueName: "n"))
    var connections: Int?

    @Flag(name: .customShort("p"), help: "Show a progress bar on stderr (when it is a terminal).")
    var showProgress = false

    @Option(name: .customLong("progress"),
            help: ArgumentHelp("'json': print progress as one JSON object per line on stdout.", valueName: "json"))
    var progressFormat: String?

    @Flag(name: .customShort("q"), help: "Quiet: no progress bar, summary or warnings.")
    var quiet = false

    @Argument(help: ArgumentHelp("Source images, then the target.", valueName: "image"))
    var images: [String] = []

    func execute() async throws -> Int32 {
        let format = targetFormat ?? Formats.fallback.name
        let optionText = targetOptions
        if optionText.contains(where: { $0 == "help" || $0 == "?" }) {
            Terminal.out(Self.optionHelp(for: try Formats.lookup(format)))
            return 0
        }
        guard images.count >= 2 else {
            throw UsageError(message: images.isEmpty ? "expecting source and target image names" : "expecting a target image name after the source", command: "convert")
        }
        let sources = images.dropLast().map { ImageSpec($0, format: sourceFormat) }
        let target = ImageSpec(images.last!, format: format)

        var options = ConvertOptions()
        options.targetFormat = format
        options.targetOptions = try Self.parseOptions(optionText)
        if let workers { options.workers = workers }
        if let connections { options.connections = connections }
        options.outOfOrder = outOfOrder
        if let bufferSize { options.bufferSize = try Self.size(bufferSize, what: "buffer size") }
        if let sparseSize {
            options.sparseSize = try Self.size(sparseSize, what: "sparse size")
            // A larger -S than the default buffer is honoured by growing the buffer, unless
            // the buffer size was given too.
            if bufferSize == nil && options.sparseSize > options.bufferSize {
                options.bufferSize = min(ConvertOptions.maxBufferSize, (options.sparseSize + 4095) / 4096 * 4096)
            }
        }
        options.useExistingTarget = noCreate
        options.targetIsZero = targetIsZero
        options.compress = compress
        options.backingFile = backingFile
        options.backingFormat = backingFormat
        if let targetCache { options.targetCache = try Self.cache(targetCache, flag: "-t") }
        if let sourceCache {
            options.sourceCache = try Self.cache(sourceCache, flag: "-T")
            options.directColdSources = false
        }
        var jsonProgress = false
        if let progressFormat {
            guard progressFormat == "json" else {
                throw FerryError(.invalidArgument, "invalid progress format '\(progressFormat)' (allowed: json)")
            }
            jsonProgress = true
        }

        // Everything that can be checked without touching an image, before touching one.
        try options.validate()
        if let sourceFormat { _ = try Formats.lookup(sourceFormat) }
        let targetType = try Formats.lookup(format, writing: true)
        if !noCreate {
            try Formats.validate(options: options.targetOptions, for: targetType, path: target.location)
        }
        if compress {
            try Formats.require(.compression, of: targetType, options: options.targetOptions, for: "-c (compression)", path: nil)
        }

        let reporter = ProgressReporter(bar: showProgress && !quiet && Terminal.stderrIsTerminal, json: jsonProgress)
        let quiet = quiet
        let ticker = reporter.active ? Task { await reporter.run() } : nil
        let started = ContinuousClock.now
        let stats: CopyStats
        do {
            let opts = options
            let onProgress: (@Sendable (CopyStats) -> Void)? =
                reporter.active ? { @Sendable (stats: CopyStats) -> Void in reporter.update(stats) } : nil
            let onWarning: @Sendable (String) -> Void = { if !quiet { Terminal.warn($0) } }
            stats = try await SignalCancellation.run { () async throws -> CopyStats in
                try await FerryConvert.convert(
                    sources: sources, target: target, options: opts,
                    progress: onProgress, warning: onWarning)
            }
        } catch {
            ticker?.cancel()
            _ = await ticker?.value
            reporter.finish(nil, error: String(describing: error))
            throw error
        }
        ticker?.cancel()
        _ = await ticker?.value
        reporter.finish(stats, error: nil)
        // The time the user waited: opening, copying, flushing and closing.
        let waited = ContinuousClock.now - started
        let seconds = Double(waited.components.seconds) + Double(waited.components.attoseconds) * 1e-18
        if !quiet {
            Terminal.err(Self.summary(stats, seconds: seconds))
            for note in stats.notes { Terminal.err("ferry: \(note)\n") }
        }
        return 0
    }

    /// `ferry: converted 1 GiB in 2.31 s (443 MiB/s): read 512 MiB, wrote 512 MiB, zeroed 0 B, skipped 512 MiB`
    static func summary(_ s: CopyStats, seconds: Double) -> String {
        let rate = seconds > 0 ? Int64(Double(s.virtualSize) / seconds) : 0
        return "ferry: converted \(ByteSize.human(s.virtualSize)) in \(Format.seconds(seconds)) (\(ByteSize.human(rate))/s): "
            + "read \(ByteSize.human(s.bytesRead)), wrote \(ByteSize.human(s.bytesWritten)), "
            + "zeroed \(ByteSize.human(s.bytesZeroed)), skipped \(ByteSize.human(s.bytesSkipped))\n"
    }

    /// `-o a=b,c=d` (repeatable) as a dictionary. As in qemu-img, `,,` is a literal comma
    /// inside a value.
    static func parseOptions(_ args: [String]) throws -> [String: String] {
        var result: [String: String] = [:]
        for arg in args {
            var items: [String] = []
            var current = ""
            var chars = Array(arg)[...]
            while let c = chars.popFirst() {
                if c == "," {
                    if chars.first == "," {
                        current.append(",")
                        chars.removeFirst()
                    } else {
                        items.append(current)
                        current = ""
                    }
                } else {
                    current.append(c)
                }
            }
            items.append(current)
            for item in items {
                guard let eq = item.firstIndex(of: "="), eq != item.startIndex else {
                    throw FerryError(.invalidArgument, "invalid option '\(item)' in -o (expected name=value)")
                }
                result[String(item[..<eq])] = String(item[item.index(after: eq)...])
            }
        }
        return result
    }

    static func size(_ text: String, what: String) throws -> Int {
        guard let v = ByteSize.parse(text), v <= Int64(Int.max) else {
            throw FerryError(.invalidArgument, "invalid \(what) '\(text)' (a number of bytes, optionally with a suffix k, M, G, T: e.g. 4k, 64k, 2M)")
        }
        return Int(v)
    }

    static func cache(_ text: String, flag: String) throws -> CacheMode {
        guard let mode = CacheMode(rawValue: text) else {
            throw FerryError(.invalidArgument, "invalid cache mode '\(text)' for \(flag) (allowed: \(CacheMode.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return mode
    }

    static func optionHelp(for format: any ImageFormat.Type) -> String {
        var s = "Supported \(format.name) options:\n"
        for o in format.createOptions.sorted(by: { $0.name < $1.name }) {
            s += "  " + Format.pad(o.name, 22) + " - " + o.help + "\n"
        }
        if format.createOptions.isEmpty { s += "  (none)\n" }
        return s
    }
}

// MARK: - create

struct Create: FerryCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create a new image, as qemu-img create does.",
        usage: "ferry create [-f fmt] [-o options] [-b backing [-F backing_fmt]] <image> [<size>]",
        discussion: "The size may be omitted with -b: the backing image's size is used.")

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the new image (default: raw).", valueName: "fmt"))
    var format: String = Formats.fallback.name

    @Option(name: .customShort("o", allowingJoined: true),
            help: ArgumentHelp("Creation options, 'name=value,...'; '-o help' lists them.", valueName: "options"))
    var options: [String] = []

    @Option(name: .customShort("b", allowingJoined: true),
            help: ArgumentHelp("Backing image (\(Formats.able(.backingFile))), relative to the new image's directory.", valueName: "backing"))
    var backingFile: String?

    @Option(name: .customShort("F", allowingJoined: true),
            help: ArgumentHelp("Format of the backing image (probed if omitted).", valueName: "fmt"))
    var backingFormat: String?

    @Flag(name: .customShort("q"), help: "Quiet: no warnings.")
    var quiet = false

    @Argument(help: ArgumentHelp("The new image.", valueName: "image"))
    var image: String?

    @Argument(help: ArgumentHelp("Virtual size, e.g. 10G (optional with -b).", valueName: "size"))
    var size: String?

    func execute() async throws -> Int32 {
        if options.contains(where: { $0 == "help" || $0 == "?" }) {
            Terminal.out(Convert.optionHelp(for: try Formats.lookup(format)))
            return 0
        }
        guard let image else { throw UsageError(message: "expecting an image name", command: "create") }
        var opts = try Convert.parseOptions(options)
        let f = try Formats.lookup(format, for: image, writing: true)
        if let b = backingFile {
            if let o = opts["backing_file"], o != b { throw FerryError(.invalidArgument, "-b '\(b)' contradicts -o backing_file=\(o)") }
            opts["backing_file"] = b
        }
        if let fmt = backingFormat {
            guard opts["backing_file"] != nil else { throw FerryError(.invalidArgument, "-F (the backing format) needs -b (a backing file)") }
            opts["backing_fmt"] = fmt
        }
        var bytes: Int64?
        if let text = size ?? opts["size"] {
            guard let v = ByteSize.parse(text), v >= 0 else {
                throw FerryError(.invalidArgument, "invalid size '\(text)' (a number of bytes, optionally with a suffix k, M, G, T: e.g. 10G)")
            }
            bytes = v
        }
        opts.removeValue(forKey: "size")
        try Formats.validate(options: opts, for: f, path: image)
        if bytes == nil && opts["backing_file"] == nil {
            throw FerryError(.invalidArgument, "expecting a size for the new image (a size may only be omitted with -b)")
        }
        let created = try await Images.create(image, format: f.name, size: bytes, options: opts)
        if !quiet { for w in created.warnings { Terminal.warn(w) } }
        do {
            try await Images.finish(created, durable: true)
        } catch {
            if created.createdNewFile { _ = image.withCString { unlink($0) } }
            throw error
        }
        return 0
    }
}

// MARK: - info and map

enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

struct Info: FerryCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show an image's format and sizes, as qemu-img info does.",
        discussion: """
        Given an OVA (a tar archive named *.ova or *.tar), lists its members and disks and checks \
        each member against the manifest's SHA-1/SHA-256 digests; a mismatch exits with status 1. \
        A disk inside an OVA is named X.ova/DISK, here and in convert.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain, top first.")
    var backingChain = false

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String

    func execute() async throws -> Int32 {
        if format == nil, await ArchiveLocation.isArchive(image) {
            // An OVA: its disks and the manifest's verdict on each member.
            let archive = try await Images.describeArchive(image)
            Terminal.out(output == .json ? Report.archiveJSON(archive) : Report.archiveHuman(archive))
            let errors = archive.errors
            for e in errors { Terminal.complain(e.description) }
            return errors.isEmpty ? 0 : 1
        }
        let (chain, probed, warnings) = try await Images.info(ImageSpec(image, format: format), backingChain: backingChain)
        if probed { warnProbedAsRaw(image) }
        for w in warnings { Terminal.warn(w) }
        if backingChain {
            Terminal.out(output == .json ? Report.infoChainJSON(chain) : Report.infoChainHuman(chain))
        } else {
            Terminal.out(output == .json ? Report.infoJSON(chain[0]) : Report.infoHuman(chain[0]))
        }
        return 0
    }
}

struct Map: FerryCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show where an image holds data and where it reads as zeros, as qemu-img map does.")

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String

    func execute() async throws -> Int32 {
        let (entries, probed) = try await Images.map(ImageSpec(image, format: format))
        if probed { warnProbedAsRaw(image) }
        if output == .json {
            Terminal.out(Report.mapJSON(entries))
        } else {
            let (text, error) = Report.mapHuman(entries, file: image)
            Terminal.out(text)
            if let error { throw error }
        }
        return 0
    }
}

func warnProbedAsRaw(_ image: String) {
    Terminal.warn("\(image): image format was not specified and probing guessed raw; pass -f raw to say so and silence this warning")
}
