import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

// MARK: - checksum

struct Checksum: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "checksum",
        abstract: "Print the block hash of an image's guest data, as blksum and nbdcopy --blkhash print it.",
        usage: "ferry checksum [-f fmt] [--algorithm alg] [-m n] [-p] [--output human|json] <image>",
        discussion: """
        The digest is H(H(block 0) || ... || H(block N-1) || size as 8 little-endian bytes), \
        over 64 KiB blocks of the guest data (H is SHA-256 unless --algorithm says otherwise): \
        the same for the same guest data in any format or storage. Holes and zero runs are not \
        read. `ferry convert --checksum` prints the same digest of what it copied.
        """)

    @Option(name: [.customShort("f", allowingJoined: true), .customLong("format")],
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Option(name: [.customShort("a"), .customLong("algorithm")],
            help: ArgumentHelp("The digest of each block and of the whole: any OpenSSL digest (sha256, sha512, sha1, blake2b512...).", valueName: "alg"))
    var algorithm = "sha256"

    @Option(name: .customShort("m", allowingJoined: true),
            help: ArgumentHelp("Requests in flight, 1 to \(ConvertOptions.maxWorkers) (default: found while reading).", valueName: "n"))
    var workers: Int?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image even while another process (a running VM) holds it open for writing.")
    var forceShare = false

    @Flag(name: .customLong("untrusted"), help: "The image came from a stranger: follow no backing file, data file, extent or parent it names.")
    var untrusted = false

    @Flag(name: .customShort("p"), help: "Show a progress bar on stderr (when it is a terminal).")
    var showProgress = false

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String

    func execute() async throws -> Int32 {
        if let workers, !(1 ... ConvertOptions.maxWorkers).contains(workers) {
            throw UsageError(message: "invalid number of parallel requests \(workers) (allowed: 1 to \(ConvertOptions.maxWorkers))", command: "checksum")
        }
        _ = try BlockHasher(algorithm: algorithm, size: 0)
        var endpoint = EndpointOptions(directIfCold: true)
        endpoint.forceShare = forceShare
        endpoint.untrusted = untrusted
        let reporter = ProgressReporter(bar: showProgress && Terminal.stderrIsTerminal, json: false)
        let ticker = reporter.active ? Task { await reporter.run() } : nil
        let result: ImageChecksum.Result
        do {
            let (spec, algorithm, workers, endpoint) = (ImageSpec(image, format: format), algorithm, workers, endpoint)
            result = try await SignalCancellation.run { () async throws -> ImageChecksum.Result in
                try await ImageChecksum.checksum(spec, algorithm: algorithm, workers: workers, options: endpoint,
                                                 progress: { reporter.update($0) }, warning: { Terminal.warn($0) })
            }
        } catch {
            ticker?.cancel()
            _ = await ticker?.value
            reporter.finish(nil, error: String(describing: error))
            throw error
        }
        ticker?.cancel()
        _ = await ticker?.value
        if reporter.active { reporter.finish(nil, error: nil) }
        if output == .json {
            Terminal.out(Report.json(.object([
                ("filename", .string(image)),
                ("algorithm", .string(result.algorithm)),
                ("block-size", .int(Int64(BlockHasher.blockSize))),
                ("virtual-size", .int(result.size)),
                ("checksum", .string(result.digest)),
            ]), indent: 0) + "\n")
        } else {
            // blksum's line: the digest, two spaces, the name.
            Terminal.out("\(result.digest)  \(image)\n")
        }
        return 0
    }
}
