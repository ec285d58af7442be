import FerryCore

/// Microsoft's VHD (qemu's `vpc`): fixed, dynamic and differencing disks read by
/// `VHDReader`; fixed and dynamic disks written by `VHDWriter`.
public enum VHDFormat: ImageFormat {
    public static let name = "vpc"
    public static let createOptions: [(name: String, help: String)] = [
        ("size", "Virtual disk size"),
        ("subformat", "Type of virtual hard disk format. Supported formats are {dynamic (default) | fixed}"),
        ("force_size", "Force disk size calculation to use the actual size specified, rather than using the nearest CHS-based calculation"),
        ("azure", "Fixed image for Azure: virtual size rounded up to a whole MiB and stated exactly in the footer (implies subformat=fixed)"),
    ]
    public static let subformats = ["dynamic", "fixed"]

    /// Only dynamic disks keep their footer copy (`conectix`) at offset 0; a fixed disk
    /// probes as raw, as it does for qemu-img.
    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        let m = VHDLayout.footerCookie
        return header.count >= m.count && header.prefix(m.count).elementsEqual(m)
    }

    public static func checkOptions(_ options: [String: String]) throws {
        _ = try VHDCreateOptions(options)
    }

    public static func initialFileSize(for size: Int64, options: [String: String]) throws -> Int64 {
        let o = try VHDCreateOptions(options)
        let (vsize, _, _) = try o.layout(for: size)
        switch o.subformat {
        case .fixed: return vsize + Int64(VHDLayout.footerSize)
        case .dynamic: return VHDDynamicWriter.Layout(size: vsize).fileEnd + 4096
        }
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        try await VHDReader.open(file: file, context: context)
    }

    public static func create(file: any BlockDevice, size: Int64, options: [String: String],
                              context: CreateContext) async throws -> any BlockDevice {
        let o = try VHDCreateOptions(options)
        let (vsize, geometry, creator) = try o.layout(for: size)
        switch o.subformat {
        case .fixed:
            return VHDFixedWriter(name: context.location, file: file, size: vsize,
                                  footer: VHDLayout.Footer(dataOffset: UInt64.max, creatorApp: creator, size: vsize, geometry: geometry, type: .fixed))
        case .dynamic:
            return try await VHDDynamicWriter.create(name: context.location, file: file,
                footer: VHDLayout.Footer(dataOffset: 512, creatorApp: creator, size: vsize, geometry: geometry, type: .dynamic))
        }
    }
}

/// `-o` options of a new VHD image.
struct VHDCreateOptions {
    enum Subformat: String { case dynamic, fixed }
    var subformat: Subformat = .dynamic
    var forceSize = false
    var azure = false

    init(_ options: [String: String]) throws {
        func flag(_ key: String) throws -> Bool {
            guard let v = options[key] else { return false }
            switch v {
            case "on", "true", "yes": return true
            case "off", "false", "no": return false
            default: throw FerryError(.invalidArgument, "option '\(key)' must be on or off, not '\(v)'")
            }
        }
        forceSize = try flag("force_size")
        azure = try flag("azure")
        if let s = options["subformat"] {
            guard let sub = Subformat(rawValue: s) else {
                throw FerryError(.invalidArgument, "invalid subformat '\(s)' for vpc (dynamic or fixed)")
            }
            subformat = sub
        }
        if azure {
            guard options["subformat"] == nil || subformat == .fixed else {
                throw FerryError(.invalidArgument, "azure=on writes a fixed vhd; it cannot be used with subformat=dynamic")
            }
            subformat = .fixed
        }
    }

    /// The image's virtual size, geometry and creator for a requested `size`, as qemu-img:
    /// the smallest CHS geometry that holds it (creator `qemu`), or with force_size the size
    /// itself (creator `qem2`, which qemu trusts to state the size; the largest geometry).
    /// Azure: the size rounded up to a MiB, stated exactly, with its CHS geometry.
    func layout(for size: Int64) throws -> (Int64, VHDLayout.Geometry, String) {
        guard size >= 0 else { throw FerryError(.invalidArgument, "invalid size \(size)") }
        let maxSize: Int64 = 2040 << 30
        if azure {
            let v = ((size + (1 << 20) - 1) >> 20) << 20
            guard v <= maxSize else { throw FerryError(.invalidArgument, "vpc images are at most 2040 GiB (asked for \(size) bytes)") }
            return (v, VHDLayout.Geometry(forSectors: v / VHDLayout.sector), "qem2")
        }
        if forceSize {
            let v = (size + VHDLayout.sector - 1) / VHDLayout.sector * VHDLayout.sector
            guard v <= maxSize else { throw FerryError(.invalidArgument, "vpc images are at most 2040 GiB (asked for \(size) bytes)") }
            return (v, .max, "qem2")
        }
        guard let g = VHDLayout.Geometry.covering(bytes: size) else {
            // Past what a geometry can state: the largest geometry, which readers take to
            // mean "see the current size".
            let v = (size + VHDLayout.sector - 1) / VHDLayout.sector * VHDLayout.sector
            guard v <= maxSize else { throw FerryError(.invalidArgument, "vpc images are at most 2040 GiB (asked for \(size) bytes)") }
            return (v, .max, "qemu")
        }
        return (g.totalSectors * VHDLayout.sector, g, "qemu")
    }
}
