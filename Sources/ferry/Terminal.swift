#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

private func sysWrite(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Int {
    #if canImport(Glibc)
    return Glibc.write(fd, p, n)
    #else
    return Darwin.write(fd, p, n)
    #endif
}

/// Plain output through `write(2)`, so that lines from the progress ticker, warnings and the
/// final result never interleave inside a line (stdio buffers would).
enum Terminal {
    /// Writes all of `text` to `fd`, retrying on EINTR and short writes. A closed pipe stops
    /// the command that is running, or ends a command that only prints when it is stdout
    /// (`SignalCancellation.outputClosed`); other output errors are ignored: there is nowhere
    /// left to report them.
    static func write(_ text: String, to fd: Int32) {
        var text = text
        text.withUTF8 { bytes in
            var done = 0
            while done < bytes.count {
                let n = sysWrite(fd, bytes.baseAddress! + done, bytes.count - done)
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EPIPE { SignalCancellation.outputClosed(fd: fd) }
                    return
                }
                done += n
            }
        }
    }

    static func out(_ text: String) { write(text, to: STDOUT_FILENO) }
    static func err(_ text: String) { write(text, to: STDERR_FILENO) }

    /// One line on stderr, `ferry: ...`, with any newline in the message folded into a space
    /// so that an error is always exactly one line.
    static func complain(_ message: String) {
        let line = message.split(omittingEmptySubsequences: true, whereSeparator: { $0 == "\n" || $0 == "\r" })
            .joined(separator: " ")
        err("ferry: \(line)\n")
    }

    static func warn(_ message: String) { complain("warning: \(message)") }

    static var stderrIsTerminal: Bool { isatty(STDERR_FILENO) == 1 }

    /// Columns of the terminal on stderr, 80 if unknown.
    static var stderrColumns: Int {
        var w = winsize()
        if ioctl(STDERR_FILENO, UInt(TIOCGWINSZ), &w) == 0, w.ws_col > 0 { return Int(w.ws_col) }
        return 80
    }
}

/// Fixed-point and duration formatting without Foundation.
enum Format {
    /// `value` with `digits` decimals, rounded.
    static func fixed(_ value: Double, _ digits: Int) -> String {
        guard value.isFinite else { return "0" }
        var scale: Int64 = 1
        for _ in 0 ..< digits { scale *= 10 }
        let negative = value < 0
        let scaled = Int64((abs(value) * Double(scale)).rounded())
        var s = String(scaled / scale)
        if digits > 0 {
            var frac = String(scaled % scale)
            while frac.count < digits { frac = "0" + frac }
            s += "." + frac
        }
        return negative ? "-" + s : s
    }

    /// Seconds for people: `0.042 s`, `2.31 s`, `12.3 s`, `154 s`.
    static func seconds(_ s: Double) -> String {
        if s < 1 { return fixed(s, 3) + " s" }
        if s < 10 { return fixed(s, 2) + " s" }
        if s < 100 { return fixed(s, 1) + " s" }
        return fixed(s, 0) + " s"
    }

    /// A remaining time as `m:ss` or `h:mm:ss`.
    static func clock(_ s: Double) -> String {
        guard s.isFinite, s >= 0, s < 360_000 else { return "--:--" }
        let t = Int(s.rounded(.up))
        let h = t / 3600, m = (t / 60) % 60, sec = t % 60
        func two(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return h > 0 ? "\(h):\(two(m)):\(two(sec))" : "\(m):\(two(sec))"
    }

    /// `n` as qemu-img's JSON prints a string: ASCII printable as is, `"` and `\` escaped,
    /// everything else as `\uXXXX` (UTF-16, upper-case hex).
    static func jsonString(_ text: String) -> String {
        var s = "\""
        for unit in text.utf16 {
            switch unit {
            case 0x22: s += "\\\""
            case 0x5C: s += "\\\\"
            case 0x08: s += "\\b"
            case 0x0C: s += "\\f"
            case 0x0A: s += "\\n"
            case 0x0D: s += "\\r"
            case 0x09: s += "\\t"
            case 0x20 ... 0x7E: s.unicodeScalars.append(Unicode.Scalar(UInt8(unit)))
            default:
                let hex = String(unit, radix: 16, uppercase: true)
                s += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            }
        }
        return s + "\""
    }

    /// `0` or `0x1f000`, as C's `%#llx`.
    static func hex(_ v: Int64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }

    /// `text` left-aligned in `width` columns, as C's `%-Ns` (never truncated).
    static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
    }
}
