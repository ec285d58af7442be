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
        subcommands: [Convert.self, Create.self, Info.self, Map.self, Compare.self,
                      Measure.self, Resize.self, Snapshot.self, Rebase.self, Amend.self, Checksum.self, Check.self])
}

// MARK: - convert

struct Convert: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Copy one or more images into a new or existing image.",
        usage: "ferry convert [<options>] <src> ... <dst>",
        discussion: """
        Several sources are copied back to back into <dst>. Zero runs are detected and left \
        unwritten (sparse), and the target is flushed before ferry reports success unless \
        '-t unsafe' is given. A target that ferry created is removed if the copy fails. \
        A disk inside an OVA is read in place as X.ova/DISK and checked against the OVA's manifest.

        Not supported, and refused rather than ignored: --object (qemu objects such as \
        secrets).
        """)

    /// qemu-img options Ferry does not have: refused with a reason (see the discussion).
    @Option(name: .customLong("object"), help: .hidden)
    var object: String?

    @Option(name: [.customShort("f", allowingJoined: true), .customLong("source-format")],
            help: ArgumentHelp("Format of the sources (probed if omitted).", valueName: "fmt"))
    var sourceFormat: String?

    @Option(name: [.customShort("O", allowingJoined: true), .customLong("target-format")],
            help: ArgumentHelp("Format of the target (default: raw).", valueName: "fmt"))
    var targetFormat: String?

    @Option(name: [.customShort("o", allowingJoined: true), .customLong("target-format-options")],
            help: ArgumentHelp("Target creation options, 'name=value,...'; '-o help' lists them.", valueName: "options"))
    var targetOptions: [String] = []

    @Flag(name: [.customShort("c"), .customLong("compress")], help: "Compress the target's clusters (\(Formats.able(.compression)); '-o help' lists a format's compression options).")
    var compress = false

    @Option(name: [.customShort("B", allowingJoined: true), .customShort("b", allowingJoined: true), .customLong("backing")],
            help: ArgumentHelp("Make the target an overlay of this image (\(Formats.able(.backingFile))): only what the source holds above it is written.", valueName: "backing"))
    var backingFile: String?

    @Option(name: [.customShort("F", allowingJoined: true), .customLong("backing-format")],
            help: ArgumentHelp("Format of the -B image (probed if omitted).", valueName: "fmt"))
    var backingFormat: String?

    @Option(name: [.customShort("m", allowingJoined: true), .customLong("parallel")],
            help: ArgumentHelp("Requests in flight, 1 to \(ConvertOptions.maxWorkers) (default: found while copying, from 16 up to 64, as throughput rises).", valueName: "n"))
    var workers: Int?

    @Flag(name: [.customShort("W"), .customLong("oob-writes")], help: "Allow writes to complete out of order (the default where the target does not care: files, devices, exports).")
    var outOfOrder = false

    @Flag(name: .customLong("in-order"), help: "Write in guest order, as qemu-img does without -W (the default into images that allocate as data arrives).")
    var inOrder = false

    @Option(name: .customLong("max-in-flight"),
            help: ArgumentHelp("Most bytes the buffers of requests in flight may hold, capping -m (default: 128M).", valueName: "size"))
    var maxInFlight: String?

    @Option(name: [.customShort("S", allowingJoined: true), .customLong("sparse-size")],
            help: ArgumentHelp("Minimum run of zeros left unwritten, e.g. 4k or 64k; 0 writes every byte (default: 4k).", valueName: "size"))
    var sparseSize: String?

    @Flag(name: [.customShort("n"), .customLong("no-create")], help: "The target exists already; don't create it.")
    var noCreate = false

    @Flag(name: .customLong("target-is-zero"), help: "With -n: the target reads as zeros already, so zero runs are skipped.")
    var targetIsZero = false

    @Option(name: [.customShort("t", allowingJoined: true), .customLong("target-cache")],
            help: ArgumentHelp("Target cache mode: none, writeback, unsafe, writethrough, directsync (default: writeback).", valueName: "cache"))
    var targetCache: String?

    @Option(name: [.customShort("T", allowingJoined: true), .customLong("source-cache")],
            help: ArgumentHelp("Source cache mode (same values; default: writeback, but a large local file mostly not in the page cache is read with O_DIRECT).", valueName: "cache"))
    var sourceCache: String?

    @Option(name: .customLong("buffer-size"),
            help: ArgumentHelp("Largest single read or write, a multiple of 4k (default: 1M; without -m, smaller where the endpoints take many requests at once, down to 256k, so the starting depth holds 32M).", valueName: "size"))
    var bufferSize: String?

    @Option(name: .customLong("connections"),
            help: ArgumentHelp("Connections to a network server that allows several, 1 to \(ConvertOptions.maxConnections) (default: 4, and 1 to read from iSCSI).", valueName: "n"))
    var connections: Int?

    @Option(name: .customLong("timeout"),
            help: ArgumentHelp("Seconds a network server may take to answer a request before the copy fails (default: 30; 0: wait for ever).", valueName: "seconds"))
    var timeout: Double?

    @Option(name: .customLong("reconnects"),
            help: ArgumentHelp("Times a lost connection to a network server is opened again, the requests in flight sent again (default: 5; 0: fail at once).", valueName: "n"))
    var reconnects: Int?

    @Option(name: .customLong("retries"),
            help: ArgumentHelp("Times a request a network server failed with an I/O error is sent again (default: 3).", valueName: "n"))
    var retries: Int?

    @Flag(name: .customShort("p"), help: "Show a progress bar on stderr (when it is a terminal).")
    var showProgress = false

    @Option(name: .customLong("progress"),
            help: ArgumentHelp("'json': progress as one JSON object per line on stdout; 'fd:N': the same lines on descriptor N. A bare --progress is -p (qemu-img 10).", valueName: "json|fd:N"))
    var progressFormat: String?

    @Option(name: [.customShort("r", allowingJoined: true), .customLong("rate-limit")],
            help: ArgumentHelp("Most data bytes copied per second, e.g. 100M, spread evenly (zero runs are free).", valueName: "rate"))
    var rateLimit: String?

    @Flag(name: [.customShort("C"), .customLong("copy-range-offloading")],
          help: "Have the kernel copy the data (copy_file_range) between local raw files where it can; zeros in data are then copied, not detected.")
    var copyOffload = false

    @Flag(name: .customLong("image-opts"), help: "The sources are qemu option strings, e.g. driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path=SOCK (not with -f).")
    var imageOpts = false

    @Flag(name: .customLong("target-image-opts"), help: "The target is a qemu option string (needs -n).")
    var targetImageOpts = false

    @Flag(name: .customLong("untrusted"), help: "The sources came from strangers: follow no backing file, data file, extent or parent they name, and refuse a file two formats claim.")
    var untrusted = false

    @Flag(name: .customLong("bitmaps"), help: "Copy the source's persistent bitmaps into the new target (a format that stores them).")
    var bitmaps = false
    @Flag(name: .customLong("skip-broken-bitmaps"), help: "With --bitmaps, leave out bitmaps left in use (inconsistent), with a warning.")
    var skipBrokenBitmaps = false
    @Flag(name: .customLong("salvage"), help: "Read errors of the sources become zeros, each reported with its offset, and the copy goes on.")
    var salvage = false

    @Option(name: .customLong("checksum"),
            help: ArgumentHelp("Print the block hash (blkhash, as ferry checksum and blksum print it) of the data copied, computed as it passes; --checksum alone is sha256.", valueName: "alg"))
    var checksum: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Read sources even while another process (a running VM) holds them open for writing.")
    var forceShare = false

    @Flag(name: [.customShort("q"), .customLong("quiet")], help: "Quiet: no progress bar, summary or warnings.")
    var quiet = false

    @Option(name: .customShort("l", allowingJoined: true),
            help: ArgumentHelp("Copy this internal snapshot of the source instead of its active layer: 'snapshot.id=ID,snapshot.name=NAME' (either or both) or an ID or name.", valueName: "snapshot"))
    var snapshotParam: String?

    @Option(name: .customShort("s", allowingJoined: true),
            help: ArgumentHelp("Copy the internal snapshot with this ID or name (as -l NAME).", valueName: "snapshot"))
    var snapshotName: String?

    @Argument(help: ArgumentHelp("Source images, then the target.", valueName: "image"))
    var images: [String] = []

    func execute() async throws -> Int32 {
        let format = targetFormat ?? Formats.fallback.name
        let optionText = targetOptions
        if optionText.contains(where: { $0 == "help" || $0 == "?" }) {
            Terminal.out(Self.optionHelp(for: try Formats.lookup(format, writing: true), location: images.last))
            return 0
        }
        guard images.count >= 2 else {
            throw UsageError(message: images.isEmpty ? "expecting source and target image names" : "expecting a target image name after the source", command: "convert")
        }
        if object != nil {
            throw FerryError(.notSupported, "--object is not supported: ferry creates no qemu objects (no secrets, no encrypted targets)")
        }
        if imageOpts && sourceFormat != nil {
            throw UsageError(message: "--image-opts and -f cannot be used together (the option string names the driver)", command: "convert")
        }
        if targetImageOpts && !noCreate {
            throw UsageError(message: "--target-image-opts needs -n (the target must exist)", command: "convert")
        }
        if targetImageOpts && targetFormat != nil {
            throw UsageError(message: "--target-image-opts and -O cannot be used together (the option string names the driver)", command: "convert")
        }
        let snapshot = try Self.snapshotSelector(l: snapshotParam, s: snapshotName)
        if snapshot != nil && images.count > 2 {
            throw FerryError(.invalidArgument, "No support for concatenating multiple snapshot")
        }
        let sources = try images.dropLast().map { name -> ImageSpec in
            var spec = imageOpts ? try ImageOpts.parse(name) : ImageSpec(name, format: sourceFormat)
            spec.snapshot = snapshot
            return spec
        }
        let target = targetImageOpts ? try ImageOpts.parse(images.last!) : ImageSpec(images.last!, format: format)

        var options = ConvertOptions()
        options.targetFormat = format
        options.targetOptions = try Self.parseOptions(optionText)
        if let workers { options.workers = workers }
        if let connections { options.connections = connections }
        options.resilience = try Self.resilience(timeout: timeout, reconnects: reconnects, retries: retries)
        if outOfOrder && inOrder {
            throw UsageError(message: "-W and --in-order cannot be used together", command: "convert")
        }
        options.outOfOrder = outOfOrder ? true : (inOrder ? false : nil)
        if let bufferSize {
            options.bufferSize = try Self.size(bufferSize, what: "buffer size")
            options.requestWindow = nil
        }
        if let sparseSize {
            options.sparseSize = try Self.size(sparseSize, what: "sparse size")
            // A larger -S than the default buffer is honoured by growing the buffer, unless
            // the buffer size was given too.
            if bufferSize == nil && options.sparseSize > options.bufferSize {
                options.bufferSize = min(ConvertOptions.maxBufferSize, (options.sparseSize + 4095) / 4096 * 4096)
            }
        }
        if let maxInFlight {
            options.maxInFlight = try Self.size(maxInFlight, what: "bytes in flight")
        } else {
            // One request of a larger --buffer-size (or -S) fits.
            options.maxInFlight = max(options.maxInFlight, options.bufferSize)
        }
        options.forceShare = forceShare
        options.untrusted = untrusted
        options.salvage = salvage
        options.checksum = checksum
        options.bitmaps = bitmaps
        options.skipBrokenBitmaps = skipBrokenBitmaps
        options.copyOffload = copyOffload
        if let rateLimit {
            let r = try Self.size(rateLimit, what: "rate limit")
            guard r > 0 else { throw FerryError(.invalidArgument, "invalid rate limit '\(rateLimit)' (a number of bytes per second above 0)") }
            options.rateLimit = r
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
        var jsonFD = STDOUT_FILENO
        if let progressFormat {
            if progressFormat.hasPrefix("fd:"), let fd = Int32(progressFormat.dropFirst(3)), fd >= 0 {
                guard fcntl(fd, F_GETFD) >= 0 else {
                    throw FerryError(.invalidArgument, "--progress=fd:\(fd): descriptor \(fd) is not open")
                }
                jsonFD = fd
            } else if progressFormat != "json" {
                throw FerryError(.invalidArgument, "invalid progress format '\(progressFormat)' (allowed: json, fd:N)")
            }
            jsonProgress = true
        }

        // Everything that can be checked without touching an image, before touching one.
        try options.validate()
        if let sourceFormat { _ = try Formats.lookup(sourceFormat) }
        let targetType = try Formats.lookup(format, writing: true)
        if !noCreate {
            try Images.validateCreateOptions(options.targetOptions, format: targetType, location: target.location)
        }
        if compress {
            try Formats.require(.compression, of: targetType, options: options.targetOptions, for: "-c (compression)", path: nil)
        }

        let reporter = ProgressReporter(bar: showProgress && !quiet && Terminal.stderrIsTerminal, json: jsonProgress, jsonFD: jsonFD)
        let quiet = quiet
        let ticker = reporter.active ? Task { await reporter.run() } : nil
        let started = ContinuousClock.now
        let stats: CopyStats
        do {
            let opts = options
            // Always kept: SIGUSR1 asks for it whether or not anything is shown.
            let onProgress: (@Sendable (CopyStats) -> Void)? = { @Sendable (stats: CopyStats) -> Void in reporter.update(stats) }
            let onWarning: @Sendable (String) -> Void = { if !quiet { Terminal.warn($0) } }
            stats = try await SignalCancellation.run(onUSR1: { reporter.printPercent() }) { () async throws -> CopyStats in
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
        // Lost data is said even with -q.
        for r in stats.salvaged {
            Terminal.warn("could not read \(r.count) bytes of the source at offset \(r.lowerBound); wrote zeros there (--salvage)")
        }
        // Asked for, so printed even with -q: blksum's line (unless JSON progress has stdout).
        if let digest = stats.checksum, !(jsonProgress && jsonFD == STDOUT_FILENO) {
            Terminal.out("\(digest)  \(target.location)\n")
        }
        if !quiet {
            Terminal.err(Self.summary(stats, seconds: seconds))
            for note in stats.notes { Terminal.err("ferry: \(note)\n") }
            let log = Resilience.log
            if log.reconnects > 0 || log.retries > 0 {
                Terminal.err("ferry: rode out a failing server: \(log.reconnects) reconnect(s), \(log.retries) request(s) sent again\n")
            }
        }
        return 0
    }

    /// `ferry: converted 1 GiB in 2.31 s (443 MiB/s): read 512 MiB, wrote 512 MiB, zeroed 0 B, skipped 512 MiB`
    static func summary(_ s: CopyStats, seconds: Double) -> String {
        let rate = seconds > 0 ? Int64(Double(s.virtualSize) / seconds) : 0
        return "ferry: converted \(ByteSize.human(s.virtualSize)) in \(Format.seconds(seconds)) (\(ByteSize.human(rate))/s): "
            + "read \(ByteSize.human(s.bytesRead)), wrote \(ByteSize.human(s.bytesWritten)), "
            + "zeroed \(ByteSize.human(s.bytesZeroed)), skipped \(ByteSize.human(s.bytesSkipped))"
            + (s.checksum.map { ", checksum \(s.checksumAlgorithm ?? "sha256"):\($0)" } ?? "") + "\n"
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

    /// `-l snapshot.id=..,snapshot.name=..`, `-l NAME` or `-s NAME`.
    static func snapshotSelector(l: String?, s: String?) throws -> SnapshotSelector? {
        if l != nil && s != nil { throw FerryError(.invalidArgument, "-l and -s cannot be used together") }
        if let s { return SnapshotSelector(idOrName: s) }
        guard let l else { return nil }
        guard l.hasPrefix("snapshot.") else { return SnapshotSelector(idOrName: l) }
        var selector = SnapshotSelector()
        for (key, value) in try parseOptions([l]) {
            switch key {
            case "snapshot.id": selector.id = value
            case "snapshot.name": selector.name = value
            default: throw FerryError(.invalidArgument, "Invalid parameter '\(key)' in -l (allowed: snapshot.id, snapshot.name)")
            }
        }
        return selector
    }

    /// `--timeout`, `--reconnects`, `--retries`, checked, over the defaults.
    static func resilience(timeout: Double?, reconnects: Int?, retries: Int?) throws -> Resilience {
        var r = Resilience.standard
        if let timeout {
            guard timeout >= 0, timeout <= 86_400, timeout.isFinite else {
                throw FerryError(.invalidArgument, "invalid timeout \(timeout) (seconds, 0 to 86400; 0 waits for ever)")
            }
            r.timeout = timeout
        }
        if let reconnects {
            guard (0 ... 100).contains(reconnects) else { throw FerryError(.invalidArgument, "invalid number of reconnects \(reconnects) (allowed: 0 to 100)") }
            r.reconnects = reconnects
        }
        if let retries {
            guard (0 ... 100).contains(retries) else { throw FerryError(.invalidArgument, "invalid number of retries \(retries) (allowed: 0 to 100)") }
            r.retries = retries
        }
        return r
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

    /// `-o help`: the format's options, then those the storage at `location` (an RBD image)
    /// takes that the format does not.
    static func optionHelp(for format: any ImageFormat.Type, location: String? = nil) -> String {
        var s = "Supported \(format.name) options:\n"
        for o in format.createOptions.sorted(by: { $0.name < $1.name }) {
            s += "  " + Format.pad(o.name, 22) + " - " + o.help + "\n"
        }
        if format.createOptions.isEmpty { s += "  (none)\n" }
        let mine = Set(format.createOptions.map(\.name))
        let storage = location.map { Images.storageOptions(for: $0).filter { !mine.contains($0.name) } } ?? []
        if !storage.isEmpty {
            s += "\nSupported options of the target's storage:\n"
            for o in storage { s += "  " + Format.pad(o.name, 22) + " - " + o.help + "\n" }
        }
        return s
    }
}

// MARK: - create

struct Create: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a new image, as qemu-img create does.",
        usage: "ferry create [-f fmt] [-o options] [-b backing [-F backing_fmt]] <image> [<size>]",
        discussion: """
        The size may be omitted with -b: the backing image's size is used.

        Not supported: --object (no secrets, so no encrypted images), -u (a backing file that \
        does not exist yet), --image-opts.
        """)

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
            Terminal.out(Convert.optionHelp(for: try Formats.lookup(format, writing: true), location: image))
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
        try Images.validateCreateOptions(opts, format: f, location: image)
        if bytes == nil && opts["backing_file"] == nil {
            throw FerryError(.invalidArgument, "expecting a size for the new image (a size may only be omitted with -b)")
        }
        let created = try await Images.create(image, format: f.name, size: bytes, options: opts)
        if !quiet { for w in created.warnings { Terminal.warn(w) } }
        do {
            try await Images.finish(created, durable: true)
        } catch {
            if created.createdNewFile { _ = image.withCString { unlink($0) } }
            if created.createdStorage {
                created.markCreatedStorageForRemoval()
                try? await created.device.close()
            }
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
        commandName: "info",
        abstract: "Show an image's format and sizes, as qemu-img info does.",
        discussion: """
        Given an OVA (a tar archive named *.ova or *.tar), lists its members and disks and checks \
        each member against the manifest's SHA-1/SHA-256 digests; a mismatch exits with status 1. \
        A disk inside an OVA is named X.ova/DISK, here and in convert.

        Not supported: --object, --limits.
        """)

    @Option(name: [.customShort("f", allowingJoined: true), .customLong("format")],
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image even while another process (a running VM) holds it open for writing.")
    var forceShare = false

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain, top first.")
    var backingChain = false

    @Flag(name: .customLong("image-opts"), help: "The image is a qemu option string, e.g. driver=qcow2,file.filename=disk.qcow2 (not with -f).")
    var imageOpts = false

    @Flag(name: .customLong("untrusted"), help: "The image came from a stranger: follow no backing file, data file, extent or parent it names, refuse a file two formats claim, and say whether it is self-contained.")
    var untrusted = false

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String

    /// The image as given: a location and -f, or (`--image-opts`) an option string.
    static func spec(_ image: String, format: String?, imageOpts: Bool, command: String) throws -> ImageSpec {
        guard imageOpts else { return ImageSpec(image, format: format) }
        guard format == nil else {
            throw UsageError(message: "--image-opts and -f cannot be used together (the option string names the driver)", command: command)
        }
        return try ImageOpts.parse(image)
    }

    func execute() async throws -> Int32 {
        if format == nil, !imageOpts, await ArchiveLocation.isArchive(image) {
            // An OVA: its disks and the manifest's verdict on each member.
            let archive = try await Images.describeArchive(image)
            Terminal.out(output == .json ? Report.archiveJSON(archive) : Report.archiveHuman(archive))
            let errors = archive.errors
            for e in errors { Terminal.complain(e.description) }
            return errors.isEmpty ? 0 : 1
        }
        let spec = try Self.spec(image, format: format, imageOpts: imageOpts, command: "info")
        if untrusted && backingChain {
            throw UsageError(message: "--backing-chain opens backing files, which --untrusted does not", command: "info")
        }
        let chain: [ImageInfo], probed: Bool, warnings: [String]
        do {
            (chain, probed, warnings) = try await Images.info(spec, backingChain: backingChain, forceShare: forceShare, untrusted: untrusted)
        } catch let e as FerryError where untrusted && e.code == .permissionDenied {
            // Refused: the verdict still goes out, for a script that reads it.
            Terminal.out(output == .json
                ? Report.json(.object([("filename", .string(image)), ("untrusted", Report.untrustedValue([e.message]))]), indent: 0) + "\n"
                : Report.untrustedHuman([e.message]))
            throw e
        }
        if probed { warnProbedAsRaw(image) }
        for w in warnings { Terminal.warn(w) }
        if backingChain {
            Terminal.out(output == .json ? Report.infoChainJSON(chain) : Report.infoChainHuman(chain))
        } else {
            Terminal.out(output == .json ? Report.infoJSON(chain[0])
                : Report.infoHuman(chain[0]) + (chain[0].untrustedReasons.map(Report.untrustedHuman) ?? ""))
        }
        return 0
    }
}

struct Map: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Show where an image holds data and where it reads as zeros, as qemu-img map does.",
        discussion: "Not supported: -s/--start-offset and -l/--max-length (the whole image is mapped), --object.")

    @Option(name: [.customShort("f", allowingJoined: true), .customLong("format")],
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image even while another process (a running VM) holds it open for writing.")
    var forceShare = false

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Flag(name: .customLong("image-opts"), help: "The image is a qemu option string, e.g. driver=qcow2,file.filename=disk.qcow2 (not with -f).")
    var imageOpts = false

    @Flag(name: .customLong("untrusted"), help: "The image came from a stranger: follow no backing file, data file, extent or parent it names, and refuse a file two formats claim.")
    var untrusted = false

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String

    func execute() async throws -> Int32 {
        let (entries, probed) = try await Images.map(try Info.spec(image, format: format, imageOpts: imageOpts, command: "map"), forceShare: forceShare, untrusted: untrusted)
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
    Terminal.warn(Images.probedAsRawWarning(image))
}
