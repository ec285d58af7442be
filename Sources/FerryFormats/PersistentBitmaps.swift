import FerryCore

/// A persistent dirty bitmap of an image (qcow2's), in a form independent of the cluster
/// size it was stored with, so that `convert --bitmaps` can move it between images.
public struct PersistentBitmap: Sendable, Equatable {
    public var name: String
    /// Guest bytes per bit (a power of two).
    public var granularity: Int64
    /// Recording: the guest's writes set bits while it runs.
    public var auto: Bool
    /// Left marked in use by a process that did not close the image: its bits cannot be
    /// trusted, and `bits` is empty.
    public var inUse: Bool
    /// Bit `i % 8` of byte `i / 8` set: granule `i` has changed. Exactly enough bytes for
    /// the image's size.
    public var bits: [UInt8]

    public init(name: String, granularity: Int64, auto: Bool, inUse: Bool, bits: [UInt8]) {
        self.name = name
        self.granularity = granularity
        self.auto = auto
        self.inUse = inUse
        self.bits = bits
    }

    /// Bytes of bits a bitmap of `granularity` needs for `size` guest bytes.
    public static func byteCount(size: Int64, granularity: Int64) -> Int64 {
        ((size + granularity - 1) / granularity + 7) / 8
    }

    /// The most bytes of bits an image's bitmaps may take together, so that a hostile
    /// directory cannot make a reader allocate without bound.
    public static let maxBytes: Int64 = 512 << 20
}

/// A device whose image has persistent bitmaps to give (`convert --bitmaps`).
public protocol PersistentBitmapSource: BlockDevice {
    /// The bitmaps of this image's own layer, in-use ones included (with no bits).
    func persistentBitmaps() async throws -> [PersistentBitmap]
}

/// A device of a new image that can store persistent bitmaps, before it is committed.
public protocol PersistentBitmapStore: BlockDevice {
    /// Stores `bitmaps` (none in use) so that the image holds them once committed.
    func store(bitmaps: [PersistentBitmap]) async throws
}
