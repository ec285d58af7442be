// The `ferry` command: parses the command line, runs the command, and turns every failure
// into one line on stderr and a non-zero exit status (never a crash or a stack trace).
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ArgumentParser
import CFerryLinux
import FerryConvert
import FerryCore

#if canImport(Glibc)
// libnfs copies every WRITE into a fresh buffer of about 1 MiB, allocated and freed on the
// session's thread. glibc handed those back to the kernel and faulted them in again, zeroed,
// each time: its mmap threshold adapts upwards but its thread arenas trim. A fixed threshold
// above them and a trim threshold that keeps them cut a 1 GiB copy to NFS from 50-75k page
// faults to 10k. Memory stays what the copy has in flight at its peak.
ferry_malloc_thresholds(32 << 20, 256 << 20)
#endif

// qemu-img prints its progress on SIGUSR1 (Incus and LXD send it); until a copy installs
// its handler the signal must not kill the process.
signal(SIGUSR1, SIG_IGN)
// A closed stdout is seen as EPIPE and stops a copy cleanly (Terminal.write), instead of
// killing it with its target half written.
signal(SIGPIPE, SIG_IGN)

/// The command line, with qemu-img 10's bare `--progress` (its `-p`) told apart from
/// Ferry's `--progress=json` / `--progress json`.
let arguments: [String] = {
    var args = Array(CommandLine.arguments.dropFirst())
    for i in args.indices where args[i] == "--progress" {
        let next = i + 1 < args.count ? args[i + 1] : nil
        if next != "json" && !(next?.hasPrefix("fd:") ?? false) { args[i] = "-p" }
    }
    // `--checksum[=ALG]`: alone, the default digest.
    for i in args.indices where args[i] == "--checksum" { args[i] = "--checksum=sha256" }
    return args
}()
// libnbd and the like load on threads of their own while the arguments are parsed.
Images.preloadLibraries(for: arguments)
let subcommands = ["convert", "create", "info", "map", "compare"]
    + ["measure", "resize", "snapshot", "rebase", "amend", "checksum", "check"]

/// `Try 'ferry convert --help' ...` for the subcommand being used, if any.
func tryHelp(_ command: String?) -> String {
    "Try 'ferry\(command.map { " " + $0 } ?? "") --help' for more information.\n"
}

// The man page, from the command definitions (`make install` writes it).
if arguments == ["--generate-manual"] {
    Terminal.out(Manual.page())
    exit(0)
}

if let first = arguments.first, !first.hasPrefix("-"), !subcommands.contains(first), first != "help" {
    Terminal.complain("unknown command '\(first)' (commands: \(subcommands.joined(separator: ", ")))")
    Terminal.err(tryHelp(nil))
    exit(1)
}

var parsed: ParsableCommand
do {
    parsed = try Ferry.parseAsRoot(arguments)
    if !(parsed is any FerryCommand) && !(parsed is Ferry) {
        // `--help`, `help convert`: ArgumentParser's own commands, which throw the text to print.
        try parsed.run()
    }
} catch {
    if Ferry.exitCode(for: error) == .success {
        // --help, --version.
        var text = Ferry.fullMessage(for: error)
        if !text.hasSuffix("\n") { text += "\n" }
        Terminal.out(text)
        exit(0)
    }
    let message = Ferry.message(for: error)
    let first = message.split(separator: "\n").first.map(String.init) ?? "invalid arguments"
    Terminal.complain(first)
    Terminal.err(tryHelp(arguments.first.flatMap { subcommands.contains($0) ? $0 : nil }))
    exit(1)
}

guard let command = parsed as? any FerryCommand else {
    Terminal.complain("missing command (commands: \(subcommands.joined(separator: ", ")))")
    Terminal.err(tryHelp(nil))
    exit(1)
}

do {
    exit(try await command.execute())
} catch let error as UsageError {
    Terminal.complain(error.message)
    Terminal.err(tryHelp(error.command))
    exit(1)
} catch let error as FerryError {
    Terminal.complain(error.description)
    exit(SignalCancellation.receivedSignal.map { 128 + $0 } ?? 1)
} catch is CancellationError {
    Terminal.complain("interrupted")
    exit(SignalCancellation.receivedSignal.map { 128 + $0 } ?? 1)
} catch {
    Terminal.complain(String(describing: error))
    exit(SignalCancellation.receivedSignal.map { 128 + $0 } ?? 1)
}
