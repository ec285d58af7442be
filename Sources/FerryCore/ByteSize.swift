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

    /// `1 GiB`, `68 KiB`, `512 B`: as qemu-img prints sizes for people.
    public static func human(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        // Three significant digits, trailing zeros dropped, as qemu's size_to_str.
        var text: String
        if value >= 100 { text = String(Int(value.rounded())) }
        else if value >= 10 { text = trim(String(format1: value, digits: 1)) }
        else { text = trim(String(format1: value, digits: 2)) }
        if text == "1024" && unit < units.count - 1 { text = "1"; unit += 1 }
        return "\(text) \(units[unit])"
    }

    private static func trim(_ s: String) -> String {
        guard s.contains(".") else { return s }
        var t = s
        while t.hasSuffix("0") { t.removeLast() }
        if t.hasSuffix(".") { t.removeLast() }
        return t
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s.removeFirst() }
        while s.last == set { s.removeLast() }
        return String(s)
    }

    /// Fixed-point formatting without Foundation.
    init(format1 value: Double, digits: Int) {
        var scale = 1.0
        for _ in 0 ..< digits { scale *= 10 }
        let scaled = Int64((value * scale).rounded())
        let whole = scaled / Int64(scale)
        var frac = String(scaled % Int64(scale))
        while frac.count < digits { frac = "0" + frac }
        self = digits > 0 ? "\(whole).\(frac)" : "\(whole)"
    }
}
