#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Sizes as users write them: `4096`, `64k`, `2M`, `1.5G`, `1T` (powers of 1024, as qemu-img).
public enum ByteSize {
    public static func parse(_ text: String) -> Int64? {
        let s = text.trimmingCharacters(in: " ")
        guard !s.isEmpty else { return nil }
        var digits = s
        var multiplier: Double = 1
        if let last = s.last, last.isLetter {
            digits = String(s.dropLast())
            switch last {
            case "b", "B": multiplier = 1
            case "k", "K": multiplier = 1024
            case "m", "M": multiplier = 1024 * 1024
            case "g", "G": multiplier = 1024 * 1024 * 1024
            case "t", "T": multiplier = 1024 * 1024 * 1024 * 1024
            case "p", "P": multiplier = 1024 * 1024 * 1024 * 1024 * 1024
            case "e", "E": multiplier = 1024 * 1024 * 1024 * 1024 * 1024 * 1024
            default: return nil
            }
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
              let value = Double(digits), value >= 0 else { return nil }
        let bytes = value * multiplier
        guard bytes < 9.2e18, bytes == bytes.rounded() else { return nil }
        return Int64(bytes)
    }

    /// `1 GiB`, `68 KiB`, `0.999 MiB`: as qemu-img prints sizes for people (the unit changes
    /// at 1000 of the smaller one, three significant digits as C's `%0.3g`).
    public static func human(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var exponent: Int32 = 0
        _ = frexp(Double(bytes) * 1.024, &exponent)
        let index = max(0, min(units.count - 1, Int(exponent - 1) / 10))
        var scale = 1.0
        for _ in 0 ..< index { scale *= 1024 }
        return cFormat("%0.3g", Double(bytes) / scale) + " " + units[index]
    }

    /// C's `snprintf`, for the few formats whose exact rounding matters.
    public static func cFormat(_ format: String, _ args: any CVarArg...) -> String {
        withVaList(args) { va in
            var buffer = [CChar](repeating: 0, count: 128)
            _ = vsnprintf(&buffer, buffer.count, format, va)
            return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s.removeFirst() }
        while s.last == set { s.removeLast() }
        return String(s)
    }
}
