import ArgumentParser
import FerryConvert
import FerryCore

// MARK: - compare

struct Compare: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Check whether two images hold the same guest data, as qemu-img compare does.",
        usage: "ferry compare [-f fmt] [-F fmt] [-s] [-q] [-p] [--output human|json] [--checksum[=alg]] <image1> <image2>",
        discussion: """
        Exit status: 0 if the images are identical, 1 if they differ, 2 on an error. Without -s, \
        images of different sizes are compared over the smaller size and the larger one's tail \
        must read as zeros. Where neither image holds data nothing is read. With --checksum, \
        the block hashes (ferry checksum) are compared, and either side may be a digest printed \
        earlier (by ferry checksum or convert --checksum, or blksum): two digests read nothing.
        """)

    @Option(name: .customShort("f", allowingJoined: true),
            help: ArgumentHelp("Format of the first image (probed if omitted).", valueName: "fmt"))
    var format1: String?

    @Option(name: .customShort("F", allowingJoined: true),
            help: ArgumentHelp("Format of the second image (probed if omitted).", valueName: "fmt"))
    var format2: String?

    @Flag(name: .customShort("s"), help: "Strict: the sizes and the allocation of every run must match too.")
    var strict = false

    @Flag(name: .customShort("q"), help: "Quiet: print nothing; the exit status tells.")
    var quiet = false

    @Flag(name: .customShort("p"), help: "Show a progress bar on stderr (when it is a terminal).")
    var showProgress = false

    @Option(name: .customShort("m", allowingJoined: true),
            help: ArgumentHelp("Requests in flight, 1 to \(ConvertOptions.maxWorkers) (default: 32).", valueName: "n"))
    var workers: Int?

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Option(name: .customLong("checksum"),
            help: ArgumentHelp("Compare block hashes (--checksum alone: sha256); either image may be given as its digest.", valueName: "alg"))
    var checksum: String?

    @Argument(help: ArgumentHelp("The two images.", valueName: "image"))
    var images: [String] = []

    func execute() async throws -> Int32 {
        guard images.count == 2 else {
            throw UsageError(message: "expecting two image names", command: "compare")
        }
        if let checksum { return try await compareChecksums(algorithm: checksum) }
        var options = CompareOptions()
        options.strict = strict
        if let workers {
            guard (1 ... ConvertOptions.maxWorkers).contains(workers) else {
                throw UsageError(message: "invalid number of parallel requests \(workers) (allowed: 1 to \(ConvertOptions.maxWorkers))", command: "compare")
            }
            options.workers = workers
        }
        let reporter = ProgressReporter(bar: showProgress && !quiet && Terminal.stderrIsTerminal, json: false)
        let ticker = reporter.active ? Task { await reporter.run() } : nil
        let onProgress: (@Sendable (Int64, Int64) -> Void)? = reporter.active ? { @Sendable (done: Int64, total: Int64) -> Void in
            var stats = CopyStats()
            stats.virtualSize = total
            stats.allocatedBytes = total
            stats.doneBytes = done
            reporter.update(stats)
        } : nil
        let result: CompareResult
        do {
            let opts = options
            let (a, b) = (ImageSpec(images[0], format: format1), ImageSpec(images[1], format: format2))
            result = try await SignalCancellation.run { () async throws -> CompareResult in
                try await ImageCompare.compare(a, b, options: opts, progress: onProgress)
            }
        } catch {
            ticker?.cancel()
            _ = await ticker?.value
            reporter.finish(nil, error: String(describing: error))
            // As qemu-img: an error is status 2, "different" is 1.
            Terminal.complain((error as? FerryError)?.description ?? String(describing: error))
            if let signal = SignalCancellation.receivedSignal { return 128 + signal }
            return 2
        }
        ticker?.cancel()
        _ = await ticker?.value
        if reporter.active { reporter.finish(nil, error: nil) }
        if !quiet {
            Terminal.out(output == .json ? Self.json(result) : Self.human(result))
        }
        return result.identical ? 0 : 1
    }

    /// qemu-img compare's lines, byte for byte.
    static func human(_ r: CompareResult) -> String {
        var s = ""
        switch r.verdict {
        case .sizeMismatch:
            return "Strict mode: Image size mismatch!\n"
        case .blockStatusMismatch(let offset):
            return "Strict mode: Offset \(offset) block status mismatch!\n"
        case .identical, .contentMismatch:
            if r.sizeMismatch { s += "Warning: Image size mismatch!\n" }
        }
        if case .contentMismatch(let offset) = r.verdict {
            s += "Content mismatch at offset \(offset)!\n"
        } else {
            s += "Images are identical.\n"
        }
        return s
    }

    /// `{"identical": B, "result": "...", "offset": N, "size-mismatch": B, "size1": N, "size2": N}`
    /// (`offset` only for a mismatch that has one).
    static func json(_ r: CompareResult) -> String {
        let name: String
        var offset: Int64?
        switch r.verdict {
        case .identical: name = "identical"
        case .contentMismatch(let o): name = "content-mismatch"; offset = o
        case .sizeMismatch: name = "size-mismatch"
        case .blockStatusMismatch(let o): name = "block-status-mismatch"; offset = o
        }
        var lines = [
            "\"identical\": \(r.identical)",
            "\"result\": \"\(name)\"",
        ]
        if let offset { lines.append("\"offset\": \(offset)") }
        lines += [
            "\"size-mismatch\": \(r.sizeMismatch)",
            "\"size1\": \(r.size1)",
            "\"size2\": \(r.size2)",
        ]
        return "{\n    " + lines.joined(separator: ",\n    ") + "\n}\n"
    }

    /// A digest as given: hex of the algorithm's length, optionally after `ALG:`.
    static func digest(_ text: String, algorithm: String, length: Int) -> String? {
        var hex = Substring(text.lowercased())
        if let colon = hex.firstIndex(of: ":") {
            guard hex[..<colon] == algorithm.lowercased() else { return nil }
            hex = hex[hex.index(after: colon)...]
        }
        guard hex.count == length * 2, hex.allSatisfy(\.isHexDigit) else { return nil }
        return String(hex)
    }

    /// `--checksum`: each side's block hash, from the image (read in parallel with the
    /// other) or as given.
    func compareChecksums(algorithm: String) async throws -> Int32 {
        guard images.count == 2 else {
            throw UsageError(message: "expecting two image names or digests", command: "compare")
        }
        if strict { throw UsageError(message: "-s compares allocation, which a checksum does not keep", command: "compare") }
        let length = try BlockHasher(algorithm: algorithm, size: 0).digestSize
        let given = images.map { Self.digest($0, algorithm: algorithm, length: length) }
        let specs = [ImageSpec(images[0], format: format1), ImageSpec(images[1], format: format2)]
        let digests: [String]
        do {
            digests = try await SignalCancellation.run { () async throws -> [String] in
                @Sendable func side(_ k: Int) async throws -> String {
                    if let d = given[k] { return d }
                    return try await ImageChecksum.checksum(specs[k], algorithm: algorithm).digest
                }
                async let first = side(0)
                let second = try await side(1)
                return [try await first, second]
            }
        } catch {
            Terminal.complain((error as? FerryError)?.description ?? String(describing: error))
            if let signal = SignalCancellation.receivedSignal { return 128 + signal }
            return 2
        }
        let same = digests[0] == digests[1]
        if !quiet {
            if output == .json {
                Terminal.out("{\n    \"identical\": \(same),\n    \"algorithm\": \"\(algorithm)\",\n"
                             + "    \"checksum1\": \"\(digests[0])\",\n    \"checksum2\": \"\(digests[1])\"\n}\n")
            } else {
                Terminal.out(same ? "Images are identical.\n"
                             : "Checksum mismatch: \(algorithm) \(digests[0]) (\(images[0])) against \(digests[1]) (\(images[1]))!\n")
            }
        }
        return same ? 0 : 1
    }
}
