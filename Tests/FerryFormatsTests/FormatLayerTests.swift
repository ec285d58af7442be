import XCTest
import FerryCore
import FerryFormats

/// What formats declare, and how the format list answers for them.
final class FormatLayerTests: XCTestCase {
    func testProbingClaimsEachFormatByItsMagic() throws {
        func probe(_ bytes: [UInt8]) throws -> String? {
            try bytes.withUnsafeBytes { try Formats.probe(header: $0, path: "x")?.name }
        }
        XCTAssertEqual(try probe([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]), "qcow2")
        XCTAssertEqual(try probe(Array("KDMV".utf8) + [1, 0, 0, 0]), "vmdk")
        XCTAssertEqual(try probe(Array("COWD".utf8) + [1, 0, 0, 0]), "vmdk")
        XCTAssertEqual(try probe(Array("# Disk DescriptorFile\nversion=1\n".utf8)), "vmdk")
        XCTAssertEqual(try probe([0xbe, 0xba, 0xfe, 0xca, 0, 0, 0, 0, 1]), "vmdk", "seSparse, to be refused by name")
        XCTAssertNil(try probe(Array("# Disk Descriptor".utf8)), "a prefix of the descriptor line is not a descriptor")
        XCTAssertNil(try probe([UInt8](repeating: 0, count: 512)))
        XCTAssertEqual(try probe(Array("conectix".utf8) + [0, 0, 0, 2]), "vpc")
        XCTAssertEqual(try probe(Array("vhdxfile".utf8) + [0, 0, 0, 0]), "vhdx")
        // VDI: the text pre-header and the signature at 0x40.
        var vdi = Array("<<< Oracle VM VirtualBox Disk Image >>>\n".utf8)
        vdi += [UInt8](repeating: 0, count: 0x40 - vdi.count) + [0x7f, 0x10, 0xda, 0xbe, 1, 0, 1, 0]
        XCTAssertEqual(try probe(vdi), "vdi")
    }

    func testFeaturesAnswerWhatACommandAsksFor() throws {
        XCTAssertNoThrow(try Formats.require(.compression, of: QCOW2Format.self, options: [:], for: "-c", path: nil))
        XCTAssertNoThrow(try Formats.require(.compression, of: VMDKFormat.self, options: ["subformat": "streamOptimized"], for: "-c", path: nil))
        XCTAssertThrowsError(try Formats.require(.compression, of: VMDKFormat.self, options: [:], for: "-c (compression)", path: "o.vmdk")) { e in
            let e = e as! FerryError
            XCTAssertEqual(e.code, .notSupported)
            XCTAssertEqual(e.message, "-c (compression) needs a target format that can compress (qcow2, vmdk subformat=streamOptimized), not vmdk")
            XCTAssertEqual(e.path, "o.vmdk")
        }
        XCTAssertThrowsError(try Formats.require(.backingFile, of: VMDKFormat.self, options: ["subformat": "monolithicFlat"], for: "-B", path: nil)) { e in
            XCTAssertTrue((e as! FerryError).message.hasSuffix("(qcow2, vmdk but not subformat=monolithicFlat|twoGbMaxExtentFlat, qed), not vmdk subformat=monolithicFlat"), "\(e)")
        }
        XCTAssertThrowsError(try Formats.require(.backingFile, of: RawFormat.self, options: [:], for: "-B", path: nil))
        XCTAssertTrue(VMDKFormat.features(options: ["subformat": "streamOptimized"]).contains(.sequentialWrites))
        XCTAssertFalse(VMDKFormat.features(options: [:]).contains(.sequentialWrites))
    }

    func testValidationChecksNamesThenValuesAndNamesTheImage() throws {
        XCTAssertThrowsError(try Formats.validate(options: ["cluster_size": "3k"], for: QCOW2Format.self, path: "t.qcow2")) { e in
            let e = e as! FerryError
            XCTAssertEqual(e.path, "t.qcow2")
            XCTAssertTrue(e.message.contains("cluster_size"), e.message)
        }
        XCTAssertThrowsError(try Formats.validate(options: ["preallocation": "sometimes"], for: RawFormat.self, path: "t.raw")) { e in
            XCTAssertEqual((e as! FerryError).path, "t.raw")
        }
        XCTAssertThrowsError(try Formats.validate(options: ["subformat": "x", "nope": "1"], for: VMDKFormat.self, path: "t.vmdk")) { e in
            XCTAssertTrue((e as! FerryError).message.contains("unknown option 'nope' for format vmdk"), "\(e)")
        }
        XCTAssertNoThrow(try Formats.validate(options: ["size": "1G", "cluster_size": "64k"], for: QCOW2Format.self, path: nil))
    }
}
