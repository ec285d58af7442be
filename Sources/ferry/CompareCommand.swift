import ArgumentParser
import FerryConvert
import FerryCore

// MARK: - compare

struct Compare: FerryCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check whether two images hold the same guest data, as qemu-img compare does.",
        usage: "ferry compare [-f fmt] [-F fmt] [-s] [-q] [-p] [--output human|json] <image1> <image2>",
        discussion: """
        Exit status: 0 if the images are identical, 1 if they differ, 2 on an error. Without -s, \
        images of different sizes are compared over the smaller size and the larger one's tail \
        must read as zeros. Where neither image holds data nothing is read.
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
            help: ArgumentHelp("Requests in flight, 1 to \(ConvertOptions.maxWorkers) (default: 16).", valueName: "n"))
    var workers: Int?

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Argument(help: ArgumentHelp("The two images.", valueName: "image"))
    var images: [String] = []

    func execute() async throws -> Int32 {
        guard images.count == 2 else {
            throw UsageError(message: "expecting two image names", command: "compare")
        }
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
}
