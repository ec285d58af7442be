import FerryCore

/// Opens VMDK images for reading: a sparse file (`KDMV`, `COWD`) standing alone, or a text
/// descriptor naming extent files next to it.
enum VMDKReader {
    static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        guard context.readOnly else {
            throw FerryError(.notSupported, "existing vmdk images can only be read in this version of ferry", path: path)
        }
        let first = try await vmdkReadBytes(file, at: 0, count: Int(min(file.size, 512)))
        let magic = VMDKReadBytes(bytes: first).u32(0)
        if first.starts(with: VMDKFormat.seSparseMagic) {
            throw FerryError(.notSupported, "vmdk subformat seSparse is not supported", path: path)
        }
        var opened: [any BlockDevice] = []
        do {
            var extents: [VMDKReadExtent] = []
            var descriptor: VMDKParsedDescriptor
            if magic == VMDKSparseExtent.magic || magic == VMDKSparseExtent.cowMagic {
                let sparse = try await VMDKSparseExtent.open(file, name: path, first: first)
                if sparse.cow {
                    // Text only by convention there: what does not parse says nothing.
                    let empty = try VMDKParsedDescriptor([], path: path, at: 0)
                    descriptor = (try? VMDKParsedDescriptor(sparse.descriptor ?? [], path: path, at: 512)) ?? empty
                    descriptor.extents = []
                } else if let text = sparse.descriptor {
                    descriptor = try VMDKParsedDescriptor(text, path: path, at: sparse.descriptorOffset)
                } else {
                    descriptor = try VMDKParsedDescriptor([], path: path, at: 0)
                    descriptor.createType = "monolithicSparse"
                }
                extents.append(VMDKReadExtent(start: 0, length: sparse.capacity, kind: .sparse(sparse), typeName: "",
                                              fileName: path, device: file))
            } else {
                guard file.size <= Int64(VMDKParsedDescriptor.maxBytes) else {
                    throw FerryError(.corrupt, "vmdk descriptor file is \(file.size) bytes, more than a descriptor can be (\(VMDKParsedDescriptor.maxBytes))", path: path, offset: 0)
                }
                let text = try await vmdkReadBytes(file, at: 0, count: Int(file.size))
                descriptor = try VMDKParsedDescriptor(text, path: path, at: 0)
                try checkCreateType(descriptor.createType, path: path)
                guard !descriptor.extents.isEmpty else {
                    throw FerryError(.corrupt, "vmdk descriptor names no extents", path: path, offset: 0)
                }
                var start: Int64 = 0
                for e in descriptor.extents {
                    let length = e.sectors * 512
                    guard start <= (Int64(1) << 62) - length else {
                        throw FerryError(.corrupt, "vmdk descriptor's extents add up to more than 2^62 bytes", path: path, offset: 0)
                    }
                    let ext = try await openExtent(e, start: start, path: path, context: context) { opened.append($0) }
                    extents.append(ext)
                    start += length
                }
            }
            var details = ImageDetails()
            // As qemu-img: a cluster size, and a dirty flag, only when every extent is alike.
            func kind(_ e: VMDKReadExtent) -> String {
                switch e.kind {
                case .flat: return "flat"
                case .zero: return "zero"
                case .sparse(let s): return "sparse \(s.grainBytes) \(s.compressed)"
                }
            }
            if extents.allSatisfy({ kind($0) == kind(extents[0]) }) {
                if case .sparse(let s)? = extents.first?.kind { details.clusterSize = Int(s.grainBytes) }
            } else {
                details.dirtyKnown = false
            }
            var backing: (any BlockDevice)?
            // qemu-img 7.2 follows the hint whatever parentCID says (ffffffff then fails
            // reads through the parent, as any other CID that is not the parent's).
            if let hint = descriptor.parentFileNameHint, !hint.isEmpty {
                let full = resolveRelative(hint, to: path)
                details.backingFilename = hint
                details.fullBackingFilename = full
                details.backingFormat = VMDKFormat.name
                // A VMDK's parent is a VMDK (qemu-img opens it as one, never probes it).
                if context.opensBacking {
                    backing = try await context.openBacking(full, VMDKFormat.name, context.depth + 1)
                }
            }
            details.extraFiles = extents.compactMap { $0.device === file ? nil : $0.fileName }
            details.formatSpecific = formatSpecific(descriptor, extents)
            var mismatch: String?
            if let parent = backing as? VMDKReadDevice, parent.cid != descriptor.parentCID {
                mismatch = "vmdk parent '\(parent.name)' has CID \(hex(parent.cid)), but this image was made over parentCID \(hex(descriptor.parentCID))"
            }
            return VMDKReadDevice(name: path, file: file, extents: extents, backing: backing, cid: descriptor.cid,
                                  cidMismatch: mismatch, details: details)
        } catch {
            for d in opened { try? await d.close() }
            throw error
        }
    }

    private static func hex(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: max(0, 8 - s.count)) + s
    }

    private static func checkCreateType(_ type: String, path: String) throws {
        switch type {
        case "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized",
             "vmfs", "vmfsSparse", "vmfsThin", "vmfsPreallocated", "vmfsEagerZeroedThick", "custom":
            return
        case "seSparse":
            throw FerryError(.notSupported, "vmdk subformat seSparse is not supported", path: path)
        case "":
            throw FerryError(.corrupt, "vmdk descriptor has no createType", path: path, offset: 0)
        default:
            throw FerryError(.notSupported, "vmdk subformat '\(type.prefix(40))' is not supported", path: path)
        }
    }

    /// Opens one extent file named by a descriptor, refusing names that leave its folder.
    private static func openExtent(_ e: VMDKDescriptorExtent, start: Int64, path: String, context: FormatContext,
                                   opened: (any BlockDevice) -> Void) async throws -> VMDKReadExtent {
        let length = e.sectors * 512
        let type = e.type.uppercased()
        if type == "ZERO" {
            return VMDKReadExtent(start: start, length: length, kind: .zero, typeName: e.type, fileName: nil, device: nil)
        }
        if type == "SESPARSE" {
            throw FerryError(.notSupported, "vmdk subformat seSparse is not supported (extent '\(e.fileName ?? "")')", path: path)
        }
        guard ["FLAT", "VMFS", "VMFSRAW", "VMFSRDM", "SPARSE", "VMFSSPARSE"].contains(type) else {
            throw FerryError(.notSupported, "vmdk extent type '\(e.type.prefix(24))' is not supported", path: path)
        }
        let name = e.fileName ?? ""
        if name.isEmpty || name.hasPrefix("/") || name.contains("://") || name.split(separator: "/").contains("..") {
            throw FerryError(.corrupt, "vmdk extent path '\(name.prefix(200))' escapes the descriptor's folder", path: path)
        }
        let location = resolveRelative(name, to: path)
        let device: any BlockDevice
        do {
            device = try await context.openFile(location)
        } catch let error as FerryError {
            throw FerryError(error.code, "vmdk extent file '\(name)' could not be opened: \(error.message)", path: path)
        }
        opened(device)
        if type == "SPARSE" || type == "VMFSSPARSE" {
            let first = try await vmdkReadBytes(device, at: 0, count: Int(min(device.size, 512)))
            let sparse = try await VMDKSparseExtent.open(device, name: location, first: first)
            return VMDKReadExtent(start: start, length: length, kind: .sparse(sparse), typeName: e.type, fileName: location, device: device)
        }
        return VMDKReadExtent(start: start, length: length, kind: .flat(offset: e.offset * 512), typeName: e.type,
                              fileName: location, device: device)
    }

    /// `format-specific` as qemu-img 7.2 lays it out.
    static func formatSpecific(_ d: VMDKParsedDescriptor, _ extents: [VMDKReadExtent]) -> InfoValue {
        let list: [InfoValue] = extents.map { e in
            var o: [(String, InfoValue)] = []
            if case .sparse(let s) = e.kind, s.compressed { o.append(("compressed", .bool(true))) }
            o.append(("virtual-size", .int(e.length)))
            if let f = e.fileName { o.append(("filename", .string(f))) }
            if case .sparse(let s) = e.kind { o.append(("cluster-size", .int(s.grainBytes))) }
            o.append(("format", .string(e.typeName)))
            return .object(o)
        }
        return .object([("type", .string("vmdk")), ("data", .object([
            ("cid", .int(Int64(d.cid))),
            ("parent-cid", .int(Int64(d.parentCID))),
            ("create-type", .string(d.createType)),
            ("extents", .list(list)),
        ]))])
    }
}

/// One extent of a VMDK image: where it sits in the guest and what holds it.
struct VMDKReadExtent: Sendable {
    enum Kind: Sendable {
        case flat(offset: Int64)
        case sparse(VMDKSparseExtent)
        case zero
    }
    var start: Int64
    var length: Int64
    var kind: Kind
    /// The type as the descriptor wrote it ("" for a sparse file standing alone, as qemu says).
    var typeName: String
    var fileName: String?
    var device: (any BlockDevice)?
    var end: Int64 { start + length }
}
