import FerryCore

/// VirtualBox's VDI, version 1.1: normal (dynamic) and fixed (static) images, read by
/// `VDIReader` and written by `VDIWriter`.
public enum VDIFormat: ImageFormat {
    public static let name = "vdi"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size"),
        ("static", "VDI image type (on: fixed, every block in the file; off: dynamic, blocks allocated as data arrives)"),
    ]

    /// The signature at offset 0x40 after a text pre-header (`<<< ... >>>`).
    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        guard header.count >= 0x44 else { return false }
        let text = Array("<<< ".utf8)
        return header.prefix(text.count).elementsEqual(text) && VDILayout.le32(header, 0x40) == VDILayout.signature
    }

    public static func checkOptions(_ options: [String: String]) throws {
        _ = try isStatic(options)
    }

    static func isStatic(_ options: [String: String]) throws -> Bool {
        guard let v = options["static"] else { return false }
        switch v {
        case "on", "true", "yes": return true
        case "off", "false", "no": return false
        default: throw FerryError(.invalidArgument, "option 'static' must be on or off, not '\(v)'")
        }
    }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        _ = try isStatic(options)
        return try VDILayout.New(size: size).fileEnd
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        try await VDIReader.open(file: file, context: context)
    }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        try await VDIWriter.create(name: context.location, file: file, layout: try VDILayout.New(size: size),
                                   isStatic: try isStatic(options))
    }
}

/// The VDI 1.1 header (little-endian) and the layout Ferry writes.
///
/// ```
/// 0x000 text pre-header          0x040 signature 0xbeda107f   0x044 version (1.1 = 0x00010001)
/// 0x048 header size (0x180)      0x04c image type (1 normal, 2 fixed)   0x050 flags
/// 0x054 description[256]         0x154 block map offset       0x158 data offset
/// 0x15c cylinders, heads, sectors, sector size (512), unused   0x170 disk size (u64)
/// 0x178 block size               0x17c block extra            0x180 blocks in image
/// 0x184 blocks allocated         0x188 UUIDs: image, last snapshot, link, parent
/// ```
/// Block map entries: the block's index in the data area, or free (0xffffffff) or zero
/// (0xfffffffe), both reading as zeros.
enum VDILayout {
    static let signature: UInt32 = 0xbeda_107f
    static let version: UInt32 = 0x0001_0001
    static let headerSize: UInt32 = 0x180
    static let headerEnd = 0x48 + 0x180
    static let free: UInt32 = 0xffff_ffff
    static let zero: UInt32 = 0xffff_fffe
    static let sector: Int64 = 512
    static let defaultBlockSize: Int64 = 1 << 20
    static let maxBlockSize: Int64 = 256 << 20
    static let typeNormal: UInt32 = 1
    static let typeFixed: UInt32 = 2
    static let bmapOffset: Int64 = 0x200
    /// Most blocks of a new image (the block map of a 1 PiB disk is 4 GiB).
    static let maxBlocks: Int64 = 1 << 30

    static func le32(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
        UInt32(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt32.self))
    }
    static func le64(_ b: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
        UInt64(littleEndian: b.loadUnaligned(fromByteOffset: at, as: UInt64.self))
    }
    static func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
        for i in 0 ..< 4 { b[at + i] = UInt8(truncatingIfNeeded: v >> UInt32(8 * i)) }
    }
    static func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
        for i in 0 ..< 8 { b[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(8 * i)) }
    }

    /// A new image: header, block map at 0x200, data 4 KiB aligned, 1 MiB blocks.
    struct New {
        let size: Int64
        let blocks: Int64
        let dataOffset: Int64
        init(size: Int64) throws {
            guard size >= 0 else { throw FerryError(.invalidArgument, "invalid size \(size)") }
            let s = (size + VDILayout.sector - 1) / VDILayout.sector * VDILayout.sector
            let b = (s + VDILayout.defaultBlockSize - 1) / VDILayout.defaultBlockSize
            guard b <= VDILayout.maxBlocks else {
                throw FerryError(.invalidArgument, "vdi images are at most \(VDILayout.maxBlocks) blocks of 1 MiB (asked for \(size) bytes)")
            }
            self.size = s
            blocks = b
            dataOffset = (VDILayout.bmapOffset + b * 4 + 4095) / 4096 * 4096
        }
        /// The file when every block is in it.
        var fileEnd: Int64 { dataOffset + blocks * VDILayout.defaultBlockSize }

        func header(isStatic: Bool, allocated: Int64, uuids: [UInt8]) -> [UInt8] {
            var h = [UInt8](repeating: 0, count: 512)
            let text = Array("<<< Oracle VM VirtualBox Disk Image >>>\n".utf8)
            h.replaceSubrange(0 ..< text.count, with: text)
            put32(&h, 0x40, VDILayout.signature)
            put32(&h, 0x44, VDILayout.version)
            put32(&h, 0x48, VDILayout.headerSize)
            put32(&h, 0x4c, isStatic ? VDILayout.typeFixed : VDILayout.typeNormal)
            put32(&h, 0x154, UInt32(VDILayout.bmapOffset))
            put32(&h, 0x158, UInt32(dataOffset))
            put32(&h, 0x168, UInt32(VDILayout.sector))
            put64(&h, 0x170, UInt64(size))
            put32(&h, 0x178, UInt32(VDILayout.defaultBlockSize))
            put32(&h, 0x180, UInt32(blocks))
            put32(&h, 0x184, UInt32(allocated))
            h.replaceSubrange(0x188 ..< 0x188 + 32, with: uuids)
            return h
        }
    }

    /// Two random (version 4) UUIDs: the image's and its last snapshot's.
    static func newUUIDs() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        var out: [UInt8] = []
        for _ in 0 ..< 2 {
            var u = (0 ..< 16).map { _ in UInt8.random(in: 0 ... 255, using: &g) }
            u[6] = u[6] & 0x0f | 0x40
            u[8] = u[8] & 0x3f | 0x80
            out += u
        }
        return out
    }
}

/// `check` of a VDI image, as qemu-img checks one: every block-map entry in range, no data
/// block used twice, and as many blocks in use as the header says. Nothing is repaired
/// (qemu-img cannot either: `-r` is refused as a check this format does not support).
extension VDIFormat {
    public static var hasCheck: Bool { true }

    public static func check(_ request: CheckRequest) async throws -> CheckReport {
        guard request.repair == nil else {
            throw FerryError(.notSupported, "This image format does not support checks", path: request.location)
        }
        let context = FormatContext(location: request.location, readOnly: true) { location, _, _ in
            throw FerryError(.notSupported, "vdi images have no backing files", path: location)
        }
        let device = try await VDIReader.open(file: request.file, context: context, checking: true)
        let head = AlignedBuffer(count: 512)
        try await readHost(request.file, at: 0, into: head.slice(0 ..< 512))
        let declared = VDILayout.le32(head.bytes, 0x184)
        let blocks = UInt32(device.bmap.count)
        var report = CheckReport()
        var used = Set<UInt32>()
        var count: UInt32 = 0
        for (i, e) in device.bmap.enumerated() where e < VDILayout.zero {
            guard e < blocks else {
                report.lines.append("ERROR: block index \(i) too large, is \(e)")
                report.corruptions += 1
                continue
            }
            if !used.insert(e).inserted {
                // qemu-img names the block on both sides of this line.
                report.lines.append("ERROR: block index \(e) also used by \(e)")
                report.corruptions += 1
            }
            count += 1
        }
        if count != declared {
            report.lines.append("ERROR: allocated blocks mismatch, is \(count), should be \(declared)")
            report.corruptions += 1
        }
        try await device.close()
        return report
    }
}
