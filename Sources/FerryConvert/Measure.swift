import FerryCore
import FerryFormats

extension Images {
    /// `ferry measure`: what a new image of `format` with `options` would take, made from
    /// `source` (its data, through its backing chain) or, without one, of `size` guest bytes
    /// holding nothing. As qemu-img does, the source is opened before the options are
    /// checked, and a format that cannot measure is an error naming it.
    public static func measure(source: ImageSpec?, size: Int64?, format: String, options: [String: String])
        async throws -> (measurement: SizeMeasurement, probedAsRaw: Bool, warnings: [String]) {
        let f = try Formats.lookup(format)
        if let source {
            return try await withImage(source) { image in
                let device = image.device
                let input = MeasureSource(size: device.size, dataBytes: { granularity in
                    try await dataBytes(of: device, granularity: granularity)
                }, bitmaps: (device as? DescribedDevice)?.details.persistentBitmaps)
                return (try await measure(input, format: f, options: options), image.probedAsRaw, image.warnings)
            }
        }
        return (try await measure(MeasureSource(size: size ?? 0), format: f, options: options), false, [])
    }

    static func measure(_ input: MeasureSource, format f: any ImageFormat.Type, options: [String: String]) async throws -> SizeMeasurement {
        try Formats.validate(options: options, for: f, path: nil)
        guard let m = try await f.measure(input, options: options.filter { $0.key != "size" }) else {
            throw FerryError(.notSupported, "Block driver '\(f.name)' does not support size measurement")
        }
        return m
    }

    /// The bytes of `device` in units of `granularity` that some data extent touches (zero
    /// and unallocated runs take nothing), walking the extents a batch at a time.
    static func dataBytes(of device: any BlockDevice, granularity: Int64) async throws -> Int64 {
        var total: Int64 = 0
        var counted: Int64 = -1 // the last unit counted
        try await device.forEachExtent(in: 0 ..< device.size) { e in
            guard e.kind == .data, e.length > 0 else { return }
            let first = max(e.offset / granularity, counted + 1)
            let last = (e.end - 1) / granularity
            if last >= first {
                total += (last - first + 1) * granularity
                counted = last
            }
        }
        return total
    }
}
