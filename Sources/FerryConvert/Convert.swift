import FerryCore
import FerryFile
import FerryFormats

/// Converts `sources` (copied back to back) into `target`.
///
/// Creates the target (unless `options.useExistingTarget`), copies with `options.workers`
/// requests in flight, flushes the target unless its cache mode is `unsafe`, and closes
/// everything. `progress` is called now and then from any thread with the counters so far;
/// `warning` receives one-line warnings (a format probed as raw).
///
/// On failure or cancellation the error names the image and offset, and a target this call
/// created is removed, so a failed copy never looks like a finished one.
public func convert(
    sources: [ImageSpec],
    target: ImageSpec,
    options: ConvertOptions,
    progress: (@Sendable (CopyStats) -> Void)? = nil,
    warning: (@Sendable (String) -> Void)? = nil
) async throws -> CopyStats {
    fatalError("TODO")
}
