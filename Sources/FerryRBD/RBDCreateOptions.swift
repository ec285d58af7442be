import CLibRBD
import FerryCore

/// What a new RBD image is made with: `-o` options that mean something to RBD.
public struct RBDCreateOptions: Sendable, Equatable {
    /// log2 of the object size (12 to 25: 4 KiB to 32 MiB); nil for the cluster's default.
    public var order: Int?
    /// The feature bits; nil for the cluster's default (`rbd_default_features`).
    public var features: UInt64?
    public var stripeUnit: Int64?
    public var stripeCount: Int64?
    /// A pool for the data objects (an erasure-coded one), the metadata staying in the image's.
    public var dataPool: String?

    public init() {}

    /// The `-o` names taken, with what they mean (for help and for telling them from a
    /// format's own options).
    public static let names: [(name: String, help: String)] = [
        ("object_size", "RBD object size in bytes, a power of two from 4 KiB to 32 MiB (default: the cluster's, 4 MiB)"),
        ("cluster_size", "RBD object size, as qemu-img names it for raw images on RBD"),
        ("features", "RBD image features: a number or names joined by '+' or ',,' (layering, exclusive-lock, object-map, fast-diff, deep-flatten, journaling, striping)"),
        ("stripe_unit", "RBD stripe unit in bytes (with stripe_count: fancy striping)"),
        ("stripe_count", "RBD objects a stripe spans"),
        ("data_pool", "RBD pool for the image's data objects"),
    ]

    static let featureBits: [String: UInt64] = [
        "layering": UInt64(RBD_FEATURE_LAYERING), "striping": UInt64(RBD_FEATURE_STRIPINGV2),
        "exclusive-lock": UInt64(RBD_FEATURE_EXCLUSIVE_LOCK), "object-map": UInt64(RBD_FEATURE_OBJECT_MAP),
        "fast-diff": UInt64(RBD_FEATURE_FAST_DIFF), "deep-flatten": UInt64(RBD_FEATURE_DEEP_FLATTEN),
        "journaling": UInt64(RBD_FEATURE_JOURNALING),
    ]

    /// Parses the RBD options among `options` (names not in `names` are not looked at).
    public init(_ options: [String: String], path: String) throws {
        func bad(_ key: String, _ why: String) -> FerryError {
            FerryError(.invalidArgument, "invalid \(key) '\(options[key]!)': \(why)", path: path)
        }
        func bytes(_ key: String) throws -> Int64? {
            guard let text = options[key] else { return nil }
            guard let v = ByteSize.parse(text), v > 0 else { throw bad(key, "expected a size in bytes") }
            return v
        }
        if options["object_size"] != nil && options["cluster_size"] != nil {
            throw FerryError(.invalidArgument, "object_size and cluster_size name the same thing; give one", path: path)
        }
        let sizeKey = options["object_size"] != nil ? "object_size" : "cluster_size"
        if let size = try bytes(sizeKey) {
            guard size & (size - 1) == 0, size >= 4096, size <= 32 << 20 else {
                throw bad(sizeKey, "the object size must be a power of two from 4 KiB to 32 MiB")
            }
            order = size.trailingZeroBitCount
        }
        if let text = options["features"] {
            if let n = UInt64(text) {
                features = n
            } else {
                var bits: UInt64 = 0
                for name in text.split(whereSeparator: { $0 == "+" || $0 == "," || $0 == "|" }) {
                    guard let bit = Self.featureBits[String(name)] else {
                        throw bad("features", "unknown feature '\(name)' (known: \(Self.featureBits.keys.sorted().joined(separator: ", ")))")
                    }
                    bits |= bit
                }
                features = bits
            }
        }
        stripeUnit = try bytes("stripe_unit")
        if let text = options["stripe_count"] {
            guard let n = Int64(text), n > 0 else { throw bad("stripe_count", "expected a positive number") }
            stripeCount = n
        }
        if (stripeUnit == nil) != (stripeCount == nil) {
            throw FerryError(.invalidArgument, "stripe_unit and stripe_count go together", path: path)
        }
        if let pool = options["data_pool"] {
            guard !pool.isEmpty else { throw bad("data_pool", "empty pool name") }
            dataPool = pool
        }
    }
}
