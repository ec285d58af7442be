import FerryCore

/// The `-o` options of a new qcow2 image, checked together before anything is written.
struct QCOW2CreateOptions: Sendable {
    var clusterBits = 16
    var version: UInt32 = 3
    var compression: QCOW2Compression = .deflate
    var extendedL2 = false
    var lazyRefcounts = false
    var refcountOrder: UInt32 = 4
    var preallocation = "off"
    var backingFile: String?
    var backingFormat: String?

    var clusterSize: Int { 1 << clusterBits }
    var l2Entries: Int { clusterSize / (extendedL2 ? 16 : 8) }
    var l2Coverage: Int64 { Int64(l2Entries) << Int64(clusterBits) }

    static func bad(_ message: String) -> FerryError { FerryError(.invalidArgument, message) }

    static func onOff(_ options: [String: String], _ key: String) throws -> Bool {
        guard let v = options[key] else { return false }
        switch v {
        case "on", "true", "yes": return true
        case "off", "false", "no": return false
        default: throw bad("invalid value '\(v)' for \(key) (allowed: on, off)")
        }
    }

    init(_ options: [String: String]) throws {
        if let cs = options["cluster_size"] {
            guard let v = ByteSize.parse(cs), v > 0, v & (v - 1) == 0, v >= 512, v <= 2 << 20 else {
                throw Self.bad("invalid cluster_size '\(cs)' (a power of two from 512 to 2M)")
            }
            clusterBits = Int64(v).trailingZeroBitCount
        }
        switch options["compat"] ?? "1.1" {
        case "1.1", "v3": version = 3
        case "0.10", "v2": version = 2
        case let c: throw Self.bad("invalid compat '\(c)' (allowed: 0.10, 1.1)")
        }
        switch options["compression_type"] ?? "zlib" {
        case "zlib": compression = .deflate
        case "zstd": compression = .zstd
        case let c: throw Self.bad("invalid compression_type '\(c)' (allowed: zlib, zstd)")
        }
        extendedL2 = try Self.onOff(options, "extended_l2")
        lazyRefcounts = try Self.onOff(options, "lazy_refcounts")
        if let rb = options["refcount_bits"] {
            guard let v = Int(rb), v >= 1, v <= 64, v & (v - 1) == 0 else {
                throw Self.bad("invalid refcount_bits '\(rb)' (a power of two from 1 to 64)")
            }
            refcountOrder = UInt32(v.trailingZeroBitCount)
        }
        preallocation = options["preallocation"] ?? "off"
        guard ["off", "metadata", "falloc", "full"].contains(preallocation) else {
            throw Self.bad("invalid preallocation mode '\(preallocation)' (allowed: off, metadata, falloc, full)")
        }
        backingFile = options["backing_file"].flatMap { $0.isEmpty ? nil : $0 }
        backingFormat = options["backing_fmt"].flatMap { $0.isEmpty ? nil : $0 }

        // Contradictions, as qemu-img reports them.
        if version == 2 {
            if extendedL2 { throw Self.bad("extended_l2=on needs compat=1.1") }
            if lazyRefcounts { throw Self.bad("lazy_refcounts=on needs compat=1.1") }
            if compression != .deflate { throw Self.bad("compression_type=zstd needs compat=1.1") }
            if refcountOrder != 4 { throw Self.bad("refcount_bits other than 16 needs compat=1.1") }
        }
        if extendedL2 && clusterBits < 14 {
            throw Self.bad("extended_l2=on needs a cluster_size of at least 16k")
        }
        if backingFormat != nil && backingFile == nil {
            throw Self.bad("a backing format was given without a backing file")
        }
        if backingFile != nil && preallocation != "off" {
            throw Self.bad("preallocation=\(preallocation) cannot be used with a backing file")
        }
    }
}

/// Serialises qcow2 headers (the whole first cluster: header, extensions, backing file name).
enum QCOW2HeaderWriter {
    /// Incompatible bit 63: set while Ferry writes the image, cleared when its metadata is
    /// complete. qemu and Ferry refuse to open an image with it, naming it from the table.
    static let incompleteBit: UInt64 = 1 << 63
    static let incompleteName = "ferry: conversion incomplete"

    struct Fields {
        var version: UInt32
        var clusterBits: Int
        var size: Int64
        var l1Size: Int
        var l1Offset: Int64
        var refcountTableOffset: Int64
        var refcountTableClusters: Int
        var incompatible: UInt64
        var compatible: UInt64
        var refcountOrder: UInt32
        var compression: QCOW2Compression
        var backingFile: String?
        var backingFormat: String?
        var autoclear: UInt64 = 0
        var bitmaps: (count: UInt32, directorySize: UInt64, directoryOffset: UInt64)?
    }

    static func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
        for i in 0 ..< 4 { b[at + i] = UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * i)) }
    }
    static func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
        for i in 0 ..< 8 { b[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * i)) }
    }

    /// The first cluster of the image.
    static func encode(_ f: Fields) throws -> [UInt8] {
        let cs = 1 << f.clusterBits
        var b = [UInt8](repeating: 0, count: cs)
        b[0 ..< 4] = QCOW2Header.magic[...]
        put32(&b, 4, f.version)
        put32(&b, 20, UInt32(f.clusterBits))
        put64(&b, 24, UInt64(f.size))
        put32(&b, 36, UInt32(f.l1Size))
        put64(&b, 40, UInt64(f.l1Offset))
        put64(&b, 48, UInt64(f.refcountTableOffset))
        put32(&b, 56, UInt32(f.refcountTableClusters))
        var pos = 72
        var incompatible = f.incompatible
        if f.version >= 3 {
            if f.compression != .deflate { incompatible |= QCOW2Header.compressionTypeBit }
            put64(&b, 72, incompatible)
            put64(&b, 80, f.compatible)
            put64(&b, 88, f.autoclear)
            put32(&b, 96, f.refcountOrder)
            put32(&b, 100, 112)
            b[104] = f.compression.rawValue
            pos = 112
        }
        func ext(_ type: UInt32, _ data: [UInt8]) throws {
            let padded = (data.count + 7) / 8 * 8
            guard pos + 8 + padded + 8 <= cs else { throw FerryError(.invalidArgument, "qcow2 header extensions do not fit in one cluster") }
            put32(&b, pos, type)
            put32(&b, pos + 4, UInt32(data.count))
            b[pos + 8 ..< pos + 8 + data.count] = data[...]
            pos += 8 + padded
        }
        if let fmt = f.backingFormat { try ext(QCOW2Header.extBackingFormat, Array(fmt.utf8)) }
        if let bm = f.bitmaps {
            var data = [UInt8](repeating: 0, count: 24)
            put32(&data, 0, bm.count)
            put64(&data, 8, bm.directorySize)
            put64(&data, 16, bm.directoryOffset)
            try ext(QCOW2Header.extBitmaps, data)
        }
        if incompatible & incompleteBit != 0 {
            var entry = [UInt8](repeating: 0, count: 48)
            entry[0] = 0
            entry[1] = 63
            let name = Array(incompleteName.utf8)
            entry[2 ..< 2 + name.count] = name[...]
            try ext(QCOW2Header.extFeatureNames, entry)
        }
        pos += 8 // end of extensions (zeros)
        if let backing = f.backingFile {
            let name = Array(backing.utf8)
            guard name.count <= 1023, pos + name.count <= cs else {
                throw FerryError(.invalidArgument, "backing file name is too long (\(name.count) bytes; at most 1023)")
            }
            put64(&b, 8, UInt64(pos))
            put32(&b, 16, UInt32(name.count))
            b[pos ..< pos + name.count] = name[...]
        }
        return b
    }
}
