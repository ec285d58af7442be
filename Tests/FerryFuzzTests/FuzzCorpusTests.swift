import Foundation
import XCTest
import FerryFuzz

/// Replays what `make fuzz` found: every input of the corpus and every crash it saved runs
/// through its format's reader again and must end in a result, not a trap, so a fixed crash
/// stays fixed. The seeds are real images (qemu-img made them) and must read cleanly.
final class FuzzCorpusTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fuzz")

    func inputs(_ kind: String) -> [(format: String, file: URL)] {
        let dir = Self.root.appendingPathComponent(kind)
        let fm = FileManager.default
        var result: [(String, URL)] = []
        for format in (try? fm.contentsOfDirectory(atPath: dir.path))?.sorted() ?? [] {
            let sub = dir.appendingPathComponent(format)
            for name in (try? fm.contentsOfDirectory(atPath: sub.path))?.sorted() ?? [] {
                result.append((format, sub.appendingPathComponent(name)))
            }
        }
        return result
    }

    func testCorpusAndCrashesReplay() throws {
        let corpus = inputs("corpus")
        XCTAssertGreaterThan(corpus.count, 0, "the corpus is in the repository")
        var seeds = 0
        for (format, file) in corpus + inputs("crashes") {
            XCTAssertTrue(FuzzHarness.formats.contains(format), "\(file.path): no format \(format)")
            let bytes = try Data(contentsOf: file)
            let outcome = bytes.withUnsafeBytes { FuzzHarness.run(format: format, bytes: $0) }
            if file.lastPathComponent.hasPrefix("seed") {
                XCTAssertEqual(outcome, .read, "\(file.lastPathComponent) is an image qemu-img made")
                seeds += 1
            }
        }
        XCTAssertGreaterThan(seeds, 0)
    }

    /// Every seed cut short or with a byte flipped in its header ends in a clear error or a
    /// clean read, never a trap (a small, deterministic fuzz run of its own).
    func testDamagedSeedsEndInResults() throws {
        for (format, file) in inputs("corpus") where file.lastPathComponent.hasPrefix("seed") {
            let bytes = [UInt8](try Data(contentsOf: file))
            var cuts: [[UInt8]] = [[], Array(bytes.prefix(1)), Array(bytes.prefix(bytes.count / 2)), Array(bytes.dropLast())]
            for k in stride(from: 0, to: min(bytes.count, 1024), by: 7) {
                var b = bytes
                b[k] ^= 0xFF
                cuts.append(b)
            }
            var refused = 0
            for input in cuts {
                if case .refused = input.withUnsafeBytes({ FuzzHarness.run(format: format, bytes: $0) }) { refused += 1 }
            }
            XCTAssertGreaterThan(refused, 0, "\(file.lastPathComponent): some damage is noticed")
        }
    }
}
