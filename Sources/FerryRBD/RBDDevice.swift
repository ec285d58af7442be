import CFerryRBD
import CLibRBD
import FerryCore

#if canImport(Glibc)
import Glibc
#endif

/// An RBD image in a Ceph cluster as a `BlockDevice`, through librbd's asynchronous API.
///
/// Reads, writes, zeroing, discards and flushes are `rbd_aio_*` calls: each is queued in
/// librbd and its completion (on one of librbd's threads) resumes the waiting task, so as
/// many requests are in flight as the copy sends. Allocation comes from `rbd_diff_iterate2`
/// in whole objects (the object map when the image has fast-diff), and a range no object
/// holds reads as zeros. An image created here reads as zeros (`.zeroInit`) and is removed
/// again by `removeWhenClosed` when the copy into it fails. A snapshot is read-only.
public final class RBDDevice: NetworkDevice, CreatedStorage {
    public let name: String
    public let size: Int64
    public let limits: BlockLimits
    public let capabilities: BlockCapabilities
    public let readOnly: Bool
    public var kind: String { "RBD image" }
    /// The image's object size in bytes.
    public let objectSize: Int64
    /// Whether the image keeps an object map with fast-diff that is valid: allocation is then
    /// read from the map, not found by asking for each object.
    public let fastDiff: Bool
    /// True if this device made the image (so `removeWhenClosed` may delete it).
    public let created: Bool
    private let cluster: RBDCluster
    private let image: ImageHandle
    private let removeOnClose = Locked(false)
    private let closed = Locked(false)

    /// Requests librbd takes at once to best effect. `rbd import` keeps 10 object writes in
    /// flight; more let a single OSD's queue and librbd's threads overlap.
    public var concurrency: Int { 32 }

    final class ImageHandle: @unchecked Sendable {
        let raw: rbd_image_t
        init(_ raw: rbd_image_t) { self.raw = raw }
    }

    /// Loads librbd and librados ahead of connecting (`LibraryPreload`).
    public static let preloading = LibraryPreload { _ = ferry_rbd_load_error() }

    /// True if `location` names an RBD image.
    public static func handles(_ location: String) -> Bool { RBDLocation.handles(location) }

    /// Opens an existing image (or a snapshot of one, read-only).
    public static func open(_ name: String, readOnly: Bool, cache: Bool = true,
                            resilience: Resilience = .standard) async throws -> RBDDevice {
        let location = try RBDLocation(parsing: name)
        if location.snapshot != nil && !readOnly {
            throw FerryError(.readOnly, "a snapshot (@\(location.snapshot!)) can only be read", path: name)
        }
        let cluster = try await RBDCluster.connect(location, name: name, timeout: resilience.timeout, cache: cache)
        do {
            return try await openImage(cluster, name: name, readOnly: readOnly, created: false)
        } catch {
            await cluster.shutdown()
            throw error
        }
    }

    /// Creates a new image of `size` bytes with `options` and opens it for writing. An image
    /// of that name that exists already is an error: nothing of it is touched.
    public static func create(_ name: String, size: Int64, options: RBDCreateOptions = RBDCreateOptions(), cache: Bool = true,
                              resilience: Resilience = .standard) async throws -> RBDDevice {
        let location = try RBDLocation(parsing: name)
        guard location.snapshot == nil else {
            throw FerryError(.readOnly, "a snapshot (@\(location.snapshot!)) cannot be created or written", path: name)
        }
        guard size >= 0 else { throw FerryError(.invalidArgument, "negative size \(size)", path: name) }
        let cluster = try await RBDCluster.connect(location, name: name, timeout: resilience.timeout, cache: cache)
        do {
            try await blocking {
                var opts: rbd_image_options_t?
                rbd_image_options_create(&opts)
                defer { rbd_image_options_destroy(opts) }
                func set(_ option: Int, _ value: UInt64) throws {
                    let r = rbd_image_options_set_uint64(opts, Int32(option), value)
                    if r < 0 { throw RBDCluster.error(r, "could not set an image option", name: name) }
                }
                if let order = options.order { try set(RBD_IMAGE_OPTION_ORDER, UInt64(order)) }
                if let f = options.features { try set(RBD_IMAGE_OPTION_FEATURES, f) }
                if let u = options.stripeUnit { try set(RBD_IMAGE_OPTION_STRIPE_UNIT, UInt64(u)) }
                if let c = options.stripeCount { try set(RBD_IMAGE_OPTION_STRIPE_COUNT, UInt64(c)) }
                if let pool = options.dataPool {
                    let r = rbd_image_options_set_string(opts, Int32(RBD_IMAGE_OPTION_DATA_POOL), pool)
                    if r < 0 { throw RBDCluster.error(r, "could not set the data pool", name: name) }
                }
                let r = rbd_create4(cluster.io, location.image, UInt64(size), opts)
                if r == -EEXIST {
                    throw FerryError(.exists, "the image \(location.spec) exists already; use -n to write into it", path: name, errno: EEXIST)
                }
                if r < 0 { throw RBDCluster.error(r, "could not create the image \(location.spec)", name: name) }
            }
        } catch {
            await cluster.shutdown()
            throw error
        }
        do {
            return try await openImage(cluster, name: name, readOnly: false, created: true)
        } catch {
            _ = try? await blocking { rbd_remove(cluster.io, location.image) }
            await cluster.shutdown()
            throw error
        }
    }

    private static func openImage(_ cluster: RBDCluster, name: String, readOnly: Bool, created: Bool) async throws -> RBDDevice {
        let location = cluster.location
        let (handle, info, features, flags) = try await blocking { () throws -> (ImageHandle, rbd_image_info_t, UInt64, UInt64) in
            var image: rbd_image_t?
            var r = readOnly ? rbd_open_read_only(cluster.io, location.image, &image, location.snapshot)
                             : rbd_open(cluster.io, location.image, &image, nil)
            guard r == 0, let image else {
                if r == -ENOENT {
                    let what = location.snapshot.map { "there is no image \(location.pool)/\(location.image) with a snapshot '\($0)'" }
                        ?? "there is no image \(location.spec)"
                    throw FerryError(.notFound, what, path: name, errno: ENOENT)
                }
                throw RBDCluster.error(r, "could not open the image \(location.spec)", name: name)
            }
            var info = rbd_image_info_t()
            r = rbd_stat(image, &info, MemoryLayout<rbd_image_info_t>.size)
            var features: UInt64 = 0
            var flags: UInt64 = 0
            if r == 0 { r = rbd_get_features(image, &features) }
            if r == 0 { r = rbd_get_flags(image, &flags) }
            if r < 0 {
                rbd_close(image)
                throw RBDCluster.error(r, "could not read what the image \(location.spec) is", name: name)
            }
            return (ImageHandle(image), info, features, flags)
        }
        let fastDiff = features & UInt64(RBD_FEATURE_FAST_DIFF) != 0 && flags & UInt64(RBD_FLAG_FAST_DIFF_INVALID) == 0
        return RBDDevice(name: name, cluster: cluster, image: handle, size: Int64(info.size), objectSize: Int64(info.obj_size),
                         readOnly: readOnly, created: created, fastDiff: fastDiff)
    }

    private init(name: String, cluster: RBDCluster, image: ImageHandle, size: Int64, objectSize: Int64,
                 readOnly: Bool, created: Bool, fastDiff: Bool) {
        self.name = name
        self.cluster = cluster
        self.image = image
        self.size = size
        self.objectSize = max(objectSize, 4096)
        self.readOnly = readOnly
        self.created = created
        self.fastDiff = fastDiff
        // An object is what one OSD operation serves (the copy keeps its own 2 MiB requests:
        // object-sized ones measured the same).
        limits = BlockLimits(alignment: 1, preferredTransfer: Int(min(self.objectSize, 4 << 20)), maximumTransfer: 32 << 20)
        var caps: BlockCapabilities = [.extents, .flush, .cheapZeroReads]
        if !readOnly { caps.formUnion([.write, .zero, .discard, .anyWriteOrder]) }
        if created { caps.insert(.zeroInit) }
        capabilities = caps
    }

    // MARK: Asynchronous calls

    private final class Waiter: @unchecked Sendable {
        let continuation: CheckedContinuation<Int, Never>
        init(_ c: CheckedContinuation<Int, Never>) { continuation = c }
    }

    /// Starts one `rbd_aio_*` call through `start` and waits for its completion; returns the
    /// call's result (negative: an errno). `issued` runs once the call is queued in librbd.
    private func aio(issued: (@Sendable () -> Void)? = nil, _ start: (rbd_completion_t) -> Int32) async -> Int {
        await withCheckedContinuation { (continuation: CheckedContinuation<Int, Never>) in
            let waiter = Unmanaged.passRetained(Waiter(continuation)).toOpaque()
            var completion: rbd_completion_t?
            var r = rbd_aio_create_completion(waiter, { c, arg in
                let waiter = Unmanaged<Waiter>.fromOpaque(arg!).takeRetainedValue()
                let value = rbd_aio_get_return_value(c)
                rbd_aio_release(c)
                waiter.continuation.resume(returning: Int(value))
            }, &completion)
            guard r == 0, let completion else {
                Unmanaged<Waiter>.fromOpaque(waiter).release()
                continuation.resume(returning: Int(r < 0 ? r : -EIO))
                return
            }
            r = start(completion)
            if r < 0 {
                rbd_aio_release(completion)
                Unmanaged<Waiter>.fromOpaque(waiter).release()
                continuation.resume(returning: Int(r))
                return
            }
            issued?()
        }
    }

    private func check(_ r: Int, _ what: String, offset: Int64?) throws {
        if r < 0 { throw RBDCluster.error(Int32(r), what, name: name, offset: offset) }
    }

    // MARK: BlockDevice

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer) async throws {
        try checkRange(offset, Int64(buffer.count))
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let image = image.raw
        let r = await aio { rbd_aio_read(image, UInt64(offset), buffer.count, base.assumingMemoryBound(to: CChar.self), $0) }
        try check(r, "read failed", offset: offset)
        if r != buffer.count {
            throw FerryError(.shortRead, "read \(r) of \(buffer.count) bytes", path: name, offset: offset)
        }
    }

    /// Issued once librbd has queued the write.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: WriteFlags,
                      issued: @escaping @Sendable () -> Void) async throws {
        guard let base = try checkWrite(offset, buffer) else { issued(); return }
        let image = image.raw
        let fua = flags.contains(.fua)
        let r = await aio(issued: fua ? nil : issued) {
            rbd_aio_write(image, UInt64(offset), buffer.count, base.assumingMemoryBound(to: CChar.self), $0)
        }
        try check(r, "write failed", offset: offset)
        if fua {
            try await flush()
            issued()
        }
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: ZeroFlags) async throws {
        try checkWrite(offset, length)
        guard length > 0 else { return }
        let image = image.raw
        // librbd zeroes whole objects by removing them and the rest by writing zeros, both
        // inside the cluster: always cheaper than sending zero bytes.
        var done: Int64 = 0
        while done < length {
            let n = min(length - done, 1 << 30)
            let at = offset + done
            let r = await aio { rbd_aio_write_zeroes(image, UInt64(at), Int(n), $0, 0, 0) }
            try check(r, "zeroing failed", offset: at)
            done += n
        }
        if flags.contains(.fua) { try await flush() }
    }

    public func discard(at offset: Int64, length: Int64) async throws {
        try checkWrite(offset, length)
        guard length > 0 else { return }
        let image = image.raw
        let r = await aio { rbd_aio_discard(image, UInt64(offset), UInt64(length), $0) }
        try check(r, "discard failed", offset: offset)
    }

    /// At most this many extents per call: the caller asks again from where it stopped.
    static let extentsPerCall = 4096

    public func extents(in range: Range<Int64>) async throws -> [Extent] {
        try checkRange(range.lowerBound, Int64(range.count))
        let from = range.lowerBound
        guard from < size else { return [] }
        // Without fast-diff librbd asks the OSD about each object: keep each call to about a
        // thousand objects so a huge image answers as it goes.
        let span = fastDiff ? size - from : min(size - from, max(Int64(range.count), objectSize * 1024))
        let found = try await blocking { [self] () throws -> (runs: [(Int64, Int64)], complete: Bool) in
            final class Collector {
                var runs: [(Int64, Int64)] = []
                var full = false
            }
            let collector = Collector()
            let r = withExtendedLifetime(collector) {
                rbd_diff_iterate2(image.raw, nil, UInt64(from), UInt64(span), 1, 1, { offset, length, exists, arg in
                    let c = Unmanaged<Collector>.fromOpaque(arg!).takeUnretainedValue()
                    if exists != 0 { c.runs.append((Int64(offset), Int64(length))) }
                    if c.runs.count >= RBDDevice.extentsPerCall {
                        c.full = true
                        return -ECANCELED
                    }
                    return 0
                }, Unmanaged.passUnretained(collector).toOpaque())
            }
            if r < 0 && !(r == -ECANCELED && collector.full) {
                throw RBDCluster.error(r, "could not read the allocation map", name: name, offset: from)
            }
            return (collector.runs, !collector.full)
        }
        let end = found.complete ? from + span : (found.runs.map { $0.0 + $0.1 }.max() ?? from + span)
        var out: [Extent] = []
        var at = from
        for (offset, length) in found.runs.sorted(by: { $0.0 < $1.0 }) {
            let start = max(offset, at)
            let stop = min(offset + length, end)
            guard stop > start else { continue }
            if start > at { out.append(Extent(offset: at, length: start - at, kind: .zero)) }
            out.append(Extent(offset: start, length: stop - start, kind: .data))
            at = stop
        }
        if at < end { out.append(Extent(offset: at, length: end - at, kind: .zero)) }
        return out.coalesced()
    }

    public func flush() async throws {
        guard !readOnly else { return }
        let image = image.raw
        let r = await aio { rbd_aio_flush(image, $0) }
        try check(r, "flush failed", offset: nil)
    }

    public func removeWhenClosed() {
        guard created else { return }
        removeOnClose.withLock { $0 = true }
    }

    /// Closing twice (a copy that failed while finishing closes again) does nothing the
    /// second time.
    public func close() async throws {
        guard closed.withLock({ was in defer { was = true }; return !was }) else { return }
        let remove = removeOnClose.withLock { $0 }
        let location = cluster.location
        let result = try? await blocking { [self] () -> Int32 in
            var r = rbd_close(image.raw)
            if remove { r = rbd_remove(cluster.io, location.image) }
            return r
        }
        await cluster.shutdown()
        if let r = result, r < 0 {
            throw RBDCluster.error(r, remove ? "could not remove the image \(location.spec)" : "could not close the image", name: name)
        }
    }
}
