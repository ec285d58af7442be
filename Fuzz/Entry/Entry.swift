// The libFuzzer target of every format reader: `make fuzz` builds it with
// `--sanitize=fuzzer` (libFuzzer's main then runs it) and FERRY_FUZZ_FORMAT names the format.
// Built normally, it replays inputs: `ferry-fuzz FORMAT FILE...` prints each outcome.
import FerryFuzz
#if canImport(Glibc)
import Glibc
#endif

let fuzzFormat: String = {
    guard let p = getenv("FERRY_FUZZ_FORMAT") else { return "qcow2" }
    return String(cString: p)
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    _ = FuzzHarness.run(format: fuzzFormat, bytes: UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size))
    return 0
}

#if !FUZZING
@main
struct Replay {
    static func main() {
        let args = CommandLine.arguments.dropFirst()
        if args.first == "--formats" {
            print(FuzzHarness.formats.joined(separator: " "))
            return
        }
        guard let format = args.first, args.count >= 2 else {
            print("usage: ferry-fuzz FORMAT FILE...  (replays inputs; make fuzz runs libFuzzer)")
            exit(2)
        }
        for path in args.dropFirst() {
            guard let f = fopen(path, "rb") else { print("\(path): cannot open"); continue }
            var bytes: [UInt8] = []
            var chunk = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&chunk, 1, chunk.count, f)
                if n <= 0 { break }
                bytes += chunk[0 ..< n]
            }
            fclose(f)
            let outcome = bytes.withUnsafeBytes { FuzzHarness.run(format: format, bytes: $0) }
            print("\(path): \(outcome)")
        }
    }
}
#endif
