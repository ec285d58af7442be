#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import FerryConvert
import FerryCore
import FerryFormats

// MARK: - check

struct Check: FerryCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check an image's metadata for errors and leaks, and repair them, as qemu-img check does.",
        usage: "ferry check [-f fmt] [-q] [-r leaks|all] [--output human|json] <image>",
        discussion: """
        Exit status: 0 no problems, 2 corruptions (or a check that could not read something), \
        3 leaked clusters only, 1 an error, 63 a format without checks (raw). qcow2 images are \
        checked (refcounts recomputed from every table, COPIED flags); other formats say they \
        do not support checks. -r leaks repairs leaks and COPIED flags, -r all also refcounts \
        that are too low; the repaired image is checked again.
        """)

    @Option(name: [.customShort("f", allowingJoined: true), .customLong("format")],
            help: ArgumentHelp("Format of the image (probed if omitted).", valueName: "fmt"))
    var format: String?

    @Option(name: .customShort("r", allowingJoined: true), help: ArgumentHelp("Repair what is found: leaks, or all.", valueName: "leaks|all"))
    var repair: String?

    @Flag(name: [.customShort("q"), .customLong("quiet")], help: "Quiet: print nothing on stdout; the exit status tells.")
    var quiet = false

    @Option(name: .customLong("output"), help: ArgumentHelp("Output format.", valueName: "human|json"))
    var output: OutputFormat = .human

    @Argument(help: ArgumentHelp("The image.", valueName: "image"))
    var image: String

    func execute() async throws -> Int32 {
        var mode: CheckRepair?
        if let repair {
            guard let m = CheckRepair(rawValue: repair) else {
                throw UsageError(message: "Unknown option for -r: '\(repair)' (allowed: leaks, all)", command: "check")
            }
            mode = m
        }
        let result: (first: CheckReport, after: CheckReport?, format: String)
        do {
            let (spec, mode) = (ImageSpec(image, format: format), mode)
            result = try await SignalCancellation.run { try await Images.check(spec, repair: mode) }
        } catch let e as FerryError where e.code == .notSupported && e.message == "This image format does not support checks" {
            Terminal.complain(e.description)
            return 63
        }
        Self.printLines(result.first)
        if let failure = result.first.failure {
            Terminal.complain(FerryError(.io, failure, path: image).description)
            return 1
        }
        var text = ""
        if let after = result.after {
            text += "The following inconsistencies were found and repaired:\n\n"
            text += "    \(result.first.leaksFixed) leaked clusters\n    \(result.first.corruptionsFixed) corruptions\n\n"
            text += "Double checking the fixed image now...\n"
            Self.printLines(after)
        }
        let final = result.after ?? result.first
        if !quiet {
            Terminal.out(output == .json
                ? Self.json(final, fixed: result.first, filename: image, format: result.format)
                : text + Self.human(final))
        }
        return final.status
    }

    static func printLines(_ r: CheckReport) {
        for (i, line) in r.lines.enumerated() {
            if r.complaints.contains(i) { Terminal.complain(line) } else { Terminal.err(line + "\n") }
        }
    }

    /// printf's `%.2f`, which rounds as qemu-img's does (0.625 is "0.62").
    static func percent(_ part: Int64, _ whole: Int64) -> String {
        let value = whole > 0 ? Double(part) * 100 / Double(whole) : 0
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { vsnprintf(&buffer, buffer.count, "%.2f", $0) }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// qemu-img check's summary, byte for byte.
    static func human(_ r: CheckReport) -> String {
        var s = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            s += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                s += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                s += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 {
                s += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if let total = r.totalClusters, r.allocatedClusters > 0 {
            s += "\(r.allocatedClusters)/\(total) = \(percent(r.allocatedClusters, total))% allocated, "
                + "\(percent(r.fragmentedClusters, r.allocatedClusters))% fragmented, "
                + "\(percent(r.compressedClusters, r.allocatedClusters))% compressed clusters\n"
        }
        if let end = r.imageEndOffset { s += "Image end offset: \(end)\n" }
        return s
    }

    /// qemu-img check's JSON object, its keys in qemu-img's order; counts that are zero left out as it leaves them out.
    static func json(_ r: CheckReport, fixed: CheckReport, filename: String, format: String) -> String {
        var fields: [(String, String)] = []
        if let end = r.imageEndOffset { fields.append(("image-end-offset", "\(end)")) }
        if r.compressedClusters > 0 { fields.append(("compressed-clusters", "\(r.compressedClusters)")) }
        if let total = r.totalClusters { fields.append(("total-clusters", "\(total)")) }
        if fixed.corruptionsFixed > 0 { fields.append(("corruptions-fixed", "\(fixed.corruptionsFixed)")) }
        if r.corruptions > 0 { fields.append(("corruptions", "\(r.corruptions)")) }
        fields.append(("check-errors", "\(r.checkErrors)"))
        if fixed.leaksFixed > 0 { fields.append(("leaks-fixed", "\(fixed.leaksFixed)")) }
        if r.leaks > 0 { fields.append(("leaks", "\(r.leaks)")) }
        if r.allocatedClusters > 0 { fields.append(("allocated-clusters", "\(r.allocatedClusters)")) }
        fields.append(("filename", Format.jsonString(filename)))
        fields.append(("format", Format.jsonString(format)))
        if r.fragmentedClusters > 0 { fields.append(("fragmented-clusters", "\(r.fragmentedClusters)")) }
        return "{\n" + fields.map { "    \"\($0.0)\": \($0.1)" }.joined(separator: ",\n") + "\n}\n"
    }
}
