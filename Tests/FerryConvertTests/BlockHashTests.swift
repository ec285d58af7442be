import XCTest
@testable import FerryConvert

/// The blkhash construction against the vectors published with blkhash's own tests
/// (test/blkhash-test.c: SHA-256, 64 KiB blocks), fed whole, in pieces, out of order and as
/// zero runs.
final class BlockHashTests: XCTestCase {
    static let half = BlockHasher.blockSize / 2

    /// Runs of (byte, length); a byte of nil is a zero run added without data.
    func digest(_ runs: [(UInt8?, Int)], order: [Int]? = nil, piece: Int? = nil) throws -> String {
        let size = runs.reduce(0) { $0 + $1.1 }
        let h = try BlockHasher(size: Int64(size))
        var pieces: [(Int, Int, UInt8?)] = []
        var at = 0
        for (byte, n) in runs {
            var k = 0
            while k < n {
                let m = min(piece ?? n, n - k)
                pieces.append((at + k, m, byte))
                k += m
            }
            at += n
        }
        for i in order ?? Array(pieces.indices) where i < pieces.count {
            let (offset, n, byte) = pieces[i]
            if let byte {
                let bytes = [UInt8](repeating: byte, count: n)
                bytes.withUnsafeBytes { h.add(at: Int64(offset), $0) }
            } else {
                h.addZeros(at: Int64(offset), length: Int64(n))
            }
        }
        return try h.finish()
    }

    func testPublishedVectors() throws {
        let bs = BlockHasher.blockSize, half = Self.half
        let cases: [([(UInt8?, Int)], String)] = [
            ([(0x41, bs)], "2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e"),
            ([(0, bs)], "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
            ([(nil, bs)], "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
            ([(0x41, half)], "9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc"),
            ([(0, half)], "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56"),
            ([(nil, half)], "842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56"),
            ([(nil, bs * 8)], "722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d"),
            ([(nil, 1 << 30)], "c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d"),
            ([(nil, bs * 8), (nil, half)], "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c"),
            ([(0, bs * 8), (0, half)], "e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c"),
            ([(0x41, half), (0x42, half), (0x43, half), (0x44, half), (0x45, half), (0x46, half)],
             "4ab1586084326f5beb911621282e9557cd26856105eff7f78cace5986af4738b"),
            ([(0x41, half), (0x42, half), (0x43, half), (0x44, half), (0x45, half)],
             "2cad558b3a2a8d87435e80fe7bae69fa664d92eaa1b9411f573b9fbb412a4d43"),
            ([(0x41, half), (nil, half), (nil, half), (0, half), (0x45, half), (nil, half), (nil, half), (0, half)],
             "4b2b5acd96f8105f4fb26abaf35c7c5756338ef9ccce19ffe7714c9ad94b4398"),
            ([(0x41, half), (nil, half), (nil, half), (0, half), (0x45, half), (nil, half), (nil, half)],
             "2510ac29c7103f2e68c672d728cbd43db4ed3dc809a24cde96e62dc5862a0f57"),
        ]
        for (k, (runs, expected)) in cases.enumerated() {
            XCTAssertEqual(try digest(runs), expected, "vector \(k)")
            guard runs.reduce(0, { $0 + $1.1 }) <= 1 << 20 else { continue }
            // The same data in 4 KiB pieces, backwards and shuffled: the same digest.
            let n = runs.reduce(0) { $0 + ($1.1 + 4095) / 4096 }
            XCTAssertEqual(try digest(runs, order: Array((0 ..< n).reversed()), piece: 4096), expected, "vector \(k) backwards")
            XCTAssertEqual(try digest(runs, order: Array(0 ..< n).shuffled(), piece: 4096), expected, "vector \(k) shuffled")
            XCTAssertEqual(try digest(runs, piece: 3000), expected, "vector \(k) in unaligned pieces")
        }
    }

    func testEmptyAndIncomplete() throws {
        // Nothing but the length: H(le64(0)).
        XCTAssertEqual(try BlockHasher(size: 0).finish(), "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc")
        let h = try BlockHasher(size: 3 << 16)
        h.addZeros(at: 0, length: 1 << 16)
        h.addZeros(at: 2 << 16, length: 1 << 16)
        XCTAssertThrowsError(try h.finish(), "a hole in the middle is not a digest")
        XCTAssertThrowsError(try BlockHasher(algorithm: "nope", size: 1))
    }
}
