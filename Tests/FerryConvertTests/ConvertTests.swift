import XCTest
import FerryCore
import FerryFile
import FerryFormats
@testable import FerryConvert

/// `convert` and the engine over real local files.
final class ConvertTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "ferry-convert-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: dir)
    }

    func makeFile(_ name: String, size: Int, fill: (Int) -> UInt8) throws -> String {
        let path = dir + "/" + name
        let bytes = (0 ..< size).map(fill)
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
        return path
    }

    func testSourceShorterThanItClaimsIsAnErrorWithImageAndOffset() async throws {
        let path = try makeFile("src.raw", size: 1 << 20) { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        let source = try await FileDevice.open(path: path, options: .init(readOnly: true))
        // The file shrinks after it was opened: reads past the new end must not pass for zeros.
        XCTAssertEqual(truncate(path, 300_000), 0)
        let target = MemoryDevice(name: "dst", size: source.size)
        var config = CopyConfiguration()
        config.bufferSize = 65536
        do {
            _ = try await CopyEngine.copy(from: source, to: target, configuration: config)
            XCTFail("a short source must fail the copy")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .shortRead)
            XCTAssertEqual(e.path, path)
            let at = try XCTUnwrap(e.offset)
            XCTAssertGreaterThanOrEqual(at, 300_000 - 65536)
            XCTAssertLessThanOrEqual(at, 1 << 20)
            XCTAssertTrue(e.description.hasPrefix("\(path): "), e.description)
        }
        try await source.close()
    }

    func testTargetSameAsSourceIsRefusedBeforeAnythingIsTouched() async throws {
        let path = try makeFile("disk.raw", size: 65536) { _ in 0xAA }
        do {
            _ = try await convert(sources: [ImageSpec(path, format: "raw")], target: ImageSpec(path), options: ConvertOptions())
            XCTFail("converting a file onto itself must be refused")
        } catch let e as FerryError {
            XCTAssertEqual(e.code, .invalidArgument)
            XCTAssertTrue(e.message.contains("same file"), e.message)
        }
        XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: path)), Data(repeating: 0xAA, count: 65536))
    }

    func testExistingLargerTargetKeepsItsTail() async throws {
        let src = try makeFile("src.raw", size: 100_000) { UInt8(truncatingIfNeeded: $0 % 251) }
        let dst = try makeFile("dst.raw", size: 300_000) { _ in 0x55 }
        var options = ConvertOptions()
        options.useExistingTarget = true
        let stats = try await convert(sources: [ImageSpec(src, format: "raw")], target: ImageSpec(dst), options: options)
        XCTAssertEqual(stats.virtualSize, 100_000)
        let out = try Data(contentsOf: URL(fileURLWithPath: dst))
        XCTAssertEqual(out.count, 300_000)
        XCTAssertEqual(out.prefix(100_000), try Data(contentsOf: URL(fileURLWithPath: src)))
        XCTAssertEqual(out.suffix(200_000), Data(repeating: 0x55, count: 200_000))
    }

    func testEveryEngineAndCacheModeCopiesExactly() async throws {
        // Odd size: the O_DIRECT tail goes through the buffered descriptor.
        let src = try makeFile("src.raw", size: 3 * 65536 + 777) { $0 % 3 == 0 ? 0 : UInt8(truncatingIfNeeded: $0 >> 4) }
        let expected = try Data(contentsOf: URL(fileURLWithPath: src))
        for engine in [FileDevice.IOEngine.uring, .threads] {
            for cache in CacheMode.allCases {
                var options = ConvertOptions()
                options.fileEngine = engine
                options.targetCache = cache
                options.sourceCache = cache
                options.bufferSize = 65536
                let dst = dir + "/out-\(engine)-\(cache).raw"
                _ = try await convert(sources: [ImageSpec(src, format: "raw")], target: ImageSpec(dst), options: options)
                XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: dst)), expected, "\(engine) \(cache)")
            }
        }
    }
}
