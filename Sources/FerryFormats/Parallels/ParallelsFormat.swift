import FerryCore

/// Parallels expandable images (qemu's `parallels`; `docs/interop/parallels.txt`), read only.
///
/// Both header magics are read: "WithoutFreeSpace" (BAT entries in sectors, 32-bit sector
/// count) and "WithouFreSpacExt" (BAT entries in clusters). The format extension cluster
/// (`ext_off`: checksums and dirty bitmaps, nothing that changes the guest's bytes) is not
/// read. An image left open for writing (`in_use` set) is read as its BAT says, as qemu-img
/// reads it, with a warning. The "Empty Image" flag is not honoured (qemu-img 7.2 does not
/// honour it either): the BAT alone says which clusters hold data.
public enum ParallelsFormat: ReadOnlyImageFormat {
    public static let name = "parallels"

    public static func probe(header: UnsafeRawBufferPointer) -> Bool {
        ParallelsHeader.probe(header)
    }

    public static func open(file: any BlockDevice, context: FormatContext) async throws -> any BlockDevice {
        let path = context.location
        let first = try await readHeader(file, count: ParallelsHeader.size, context: context)
        let h = try ParallelsHeader(first, fileSize: file.size, path: path)
        if h.dirty {
            context.warning("\(path): parallels image was not closed cleanly (in_use is set); reading it as its BAT says")
        }
        let used = Int((h.sectors + h.clusterSectors - 1) / h.clusterSectors)
        var hosts = [Int64](repeating: 0, count: used)
        if used > 0 {
            let bat = try await vhdxReadBytes(file, at: Int64(ParallelsHeader.size), count: used * 4)
            let b = VHDXBytes(bat)
            for i in 0 ..< used {
                let entry = Int64(b.u32(i * 4))
                guard entry != 0 else { continue }
                let host = entry * h.entryUnit * ParallelsHeader.sector
                let at = Int64(ParallelsHeader.size + i * 4)
                guard host >= h.dataOffset else {
                    throw FerryError(.corrupt, "parallels BAT entry \(i) points to file offset \(host), before the data area at \(h.dataOffset)", path: path, offset: at)
                }
                guard host < file.size else {
                    throw FerryError(.corrupt, "parallels BAT entry \(i) points to file offset \(host), past the end of the file (\(file.size) bytes)", path: path, offset: at)
                }
                hosts[i] = host
            }
        }
        return ParallelsDevice(name: path, file: file, size: h.virtualSize, clusterSize: h.clusterSize, hosts: hosts)
    }
}
