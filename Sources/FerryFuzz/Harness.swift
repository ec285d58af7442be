import Dispatch
import FerryCore
import FerryFormats

/// Feeds bytes to a format's reader as if they were an image file, and reads what it then
/// claims to hold: the header and tables when it opens, the extent map, and the data of the
/// first extents (compressed clusters and grains are inflated on the way), and runs the
/// format's consistency check where it has one (`check`, without repairs). A bad image must
/// end in a `FerryError`; a trap, a crash or a hang is a bug. Used by the libFuzzer target
/// (`make fuzz`) and by the tests, which replay the corpus.
public enum FuzzHarness {
    /// Most guest bytes read per input, and most extents walked: enough to reach every
    /// table an input can point at, without letting a huge virtual size take seconds.
    static let readLimit: Int64 = 4 << 20
    static let extentLimit = 4096

    /// Every format with a reader of its own (raw has none to fuzz).
    public static var formats: [String] { Formats.all.map { $0.name }.filter { $0 != Formats.fallback.name } }

    /// Runs one input through `format` (a name in `Formats.all`); returns what it ended in.
    public static func run(format name: String, bytes: UnsafeRawBufferPointer) -> Outcome {
        guard let format = Formats.named(name) else { return .refused("unknown format \(name)") }
        let file = BytesDevice(Array(bytes))
        let done = DispatchSemaphore(value: 0)
        let result = ResultBox()
        Task {
            result.value = await exercise(format, file)
            done.signal()
        }
        done.wait()
        return result.value ?? .refused("no result")
    }

    public enum Outcome: Sendable, Equatable {
        /// Opened, mapped and read without an error.
        case read
        /// Refused with a clear error (the expected end of most inputs).
        case refused(String)
    }

    static func exercise(_ format: any ImageFormat.Type, _ file: BytesDevice) async -> Outcome {
        _ = file.bytes.withUnsafeBytes { try? Formats.probe(header: UnsafeRawBufferPointer(rebasing: $0.prefix(4096)), path: "fuzz") }
        var context = FormatContext(location: "fuzz", readOnly: true, openBacking: { location, _, _ in
            throw FerryError(.notFound, "no backing files while fuzzing", path: location)
        })
        // A backing file is named, not opened: its ranges read as zeros.
        context.opensBacking = false
        // The consistency check walks every table too, whatever the reader thought of them.
        if format.hasCheck { _ = try? await format.check(CheckRequest(location: "fuzz", file: file)) }
        do {
            let device = try await format.open(file: file, context: context)
            do {
                try await walk(device)
            } catch {
                try? await device.close()
                throw error
            }
            try await device.close()
            return .read
        } catch let e as FerryError {
            return .refused(e.description)
        } catch {
            return .refused("\(error)")
        }
    }

    /// The extent map from start to end, and the data of its first extents.
    static func walk(_ device: any BlockDevice) async throws {
        var at: Int64 = 0
        var walked = 0
        var read: Int64 = 0
        let buffer = AlignedBuffer(count: 64 << 10)
        while at < device.size, walked < extentLimit {
            let extents = try await device.extents(in: at ..< device.size)
            guard let last = extents.last, last.offset + last.length > at else {
                throw FerryError(.corrupt, "extents made no progress at \(at)", path: device.name)
            }
            for e in extents where e.kind == .data && read < readLimit {
                let n = Int(min(Int64(buffer.count), e.length, readLimit - read))
                let aligned = n / device.limits.alignment * device.limits.alignment
                guard aligned > 0, e.offset % Int64(device.limits.alignment) == 0 else { continue }
                try await device.read(at: e.offset, into: buffer.slice(0 ..< aligned))
                read += Int64(aligned)
            }
            walked += extents.count
            at = last.offset + last.length
        }
    }
}

private final class ResultBox: @unchecked Sendable {
    // Written by the task before the semaphore is signalled, read after the wait.
    var value: FuzzHarness.Outcome?
}

/// A read-only image file held in memory.
final class BytesDevice: BlockDevice {
    let bytes: [UInt8]
    let name = "fuzz"
    var size: Int64 { Int64(bytes.count) }
    let limits = BlockLimits(alignment: 1, preferredTransfer: 64 << 10, maximumTransfer: 32 << 20)
    let capabilities: BlockCapabilities = [.cheapZeroReads]

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        bytes.withUnsafeBytes { src in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset) ..< Int(offset) + buffer.count]))
        }
    }
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags) async throws {
        throw FerryError(.readOnly, "read-only", path: name)
    }
    func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        throw FerryError(.readOnly, "read-only", path: name)
    }
    func discard(at offset: Int64, length: Int64) async throws {}
    func extents(in range: Range<Int64>) async throws -> [Extent] {
        [Extent(offset: range.lowerBound, length: size - range.lowerBound, kind: .data)]
    }
    func flush() async throws {}
    func close() async throws {}
}
