import FerryConvert
import FerryCore
import Synchronization

/// Shows how a copy goes: a bar on a terminal (`-p`) and/or JSON lines on stdout
/// (`--progress=json`).
///
/// `convert` calls `update` from any thread as often as it likes; that only stores the latest
/// counters. A ticker task draws at most ten times a second from the stored counters, so the
/// copy never waits on the terminal.
final class ProgressReporter: Sendable {
    let bar: Bool
    let json: Bool
    /// Where the JSON lines go: stdout, or the descriptor of `--progress=fd:N`.
    let jsonFD: Int32
    private let started = ContinuousClock.now
    private let state = Mutex(State())

    private struct State {
        var latest: CopyStats?
        /// (seconds since start, done bytes): the last few seconds, for the current rate.
        var samples: [(t: Double, done: Int64)] = []
        var barDrawn = false
        var lastJSONDone: Int64 = -1
        var finished = false
    }

    init(bar: Bool, json: Bool, jsonFD: Int32 = 1) {
        self.bar = bar
        self.json = json
        self.jsonFD = jsonFD
    }

    /// qemu-img's answer to SIGUSR1, which Incus and LXD send to read how far a copy is:
    /// `    (45.20/100%)` and a newline, on stderr.
    func printPercent() {
        let s = state.withLock { $0.latest } ?? CopyStats()
        Terminal.err("    (" + Format.fixed(s.fraction * 100, 2) + "/100%)\n")
    }

    var active: Bool { bar || json }

    /// Stores the latest counters; called by `convert` from any thread.
    func update(_ stats: CopyStats) {
        state.withLock { $0.latest = stats }
    }

    /// Seconds since the reporter was made (just before the copy started).
    var now: Double {
        let d = ContinuousClock.now - started
        return Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
    }

    /// Draws every 100 ms until the task is cancelled.
    func run() async {
        while !Task.isCancelled {
            do { try await Task.sleep(for: .milliseconds(100)) } catch { return }
            tick()
        }
    }

    private func tick() {
        let t = now
        let snapshot: (stats: CopyStats, rate: Double, emitJSON: Bool)? = state.withLock { st in
            guard let s = st.latest, !st.finished else { return nil }
            st.samples.append((t, s.doneBytes))
            while let first = st.samples.first, t - first.t > 3, st.samples.count > 2 { st.samples.removeFirst() }
            let rate: Double
            if let first = st.samples.first, t - first.t >= 0.5 {
                rate = Double(s.doneBytes - first.done) / (t - first.t)
            } else {
                rate = t > 0 ? Double(s.doneBytes) / t : 0
            }
            let emit = json && s.doneBytes != st.lastJSONDone
            if emit { st.lastJSONDone = s.doneBytes }
            if bar { st.barDrawn = true }
            return (s, rate, emit)
        }
        guard let snapshot else { return }
        if bar { Terminal.err(barLine(snapshot.stats, rate: snapshot.rate)) }
        if snapshot.emitJSON { Terminal.write(jsonLine(snapshot.stats, rate: snapshot.rate, elapsed: t, final: false, error: nil), to: jsonFD) }
    }

    /// Ends the display: on success the bar at its final state and a newline, and the final
    /// JSON line; on failure the bar is cleared (the error line follows) and the final JSON
    /// line carries the error.
    func finish(_ final: CopyStats?, error: String?) {
        let t = now
        let (last, drawn): (CopyStats?, Bool) = state.withLock { st in
            st.finished = true
            return (final ?? st.latest, st.barDrawn)
        }
        let stats = last ?? CopyStats()
        // Wall time on the reporter's clock, like every earlier line (the engine's `elapsed`
        // stops before the final flush).
        let elapsed = t
        let rate = elapsed > 0 ? Double(stats.doneBytes) / elapsed : 0
        if bar {
            if error == nil {
                Terminal.err(barLine(stats, rate: rate, done: true) + "\n")
            } else if drawn {
                Terminal.err("\r\u{1B}[K")
            }
        }
        if json { Terminal.write(jsonLine(stats, rate: rate, elapsed: elapsed, final: true, error: error), to: jsonFD) }
    }

    /// ` 45.2% [=========>          ] 231 MiB / 512 MiB  443 MiB/s  ETA 0:03`, redrawn in
    /// place: `\r` first, erase-to-end-of-line last.
    private func barLine(_ s: CopyStats, rate: Double, done: Bool = false) -> String {
        let fraction = s.fraction
        let percent = Format.fixed(fraction * 100, 1) + "%"
        let counts = "\(ByteSize.human(s.doneBytes)) / \(ByteSize.human(s.allocatedBytes))"
        let speed = "\(ByteSize.human(Int64(max(0, rate))))/s"
        let tail: String
        if done {
            tail = "in \(Format.seconds(now))"
        } else if s.fraction >= 1 {
            // Everything is written; what remains is the flush and the close.
            tail = "finishing"
        } else {
            let remaining = Double(max(0, s.allocatedBytes - s.doneBytes))
            tail = "ETA " + (rate > 0 ? Format.clock(remaining / rate) : "--:--")
        }
        let text = "  \(counts)  \(speed)  \(tail)"
        let head = String(repeating: " ", count: max(0, 6 - percent.count)) + percent + " "
        // A fixed width (the counters' text varies in length) so the bar does not jitter.
        let width = min(40, max(10, Terminal.stderrColumns - 58))
        let filled = Int(fraction * Double(width))
        var barText = String(repeating: "=", count: filled)
        if filled < width {
            barText += ">" + String(repeating: " ", count: width - filled - 1)
        }
        return "\r" + head + "[" + barText + "]" + text + "\u{1B}[K"
    }

    /// One JSON object on one line:
    /// `{"done":N,"total":N,"percent":P,"size":N,"elapsed":S,"rate":N,"read":N,"written":N,"zeroed":N,"skipped":N,"depth":N,"max_in_flight":N,"final":B}`
    /// (`depth`: requests allowed in flight now; `max_in_flight`: the cap on the bytes their
    /// buffers hold)
    /// plus `"checksum"` and `"checksum_algorithm"` on the final line of a `--checksum` copy,
    /// `"error"` on the final line of a failed copy.
    private func jsonLine(_ s: CopyStats, rate: Double, elapsed: Double, final: Bool, error: String?) -> String {
        var fields: [(String, String)] = [
            ("done", "\(s.doneBytes)"),
            ("total", "\(s.allocatedBytes)"),
            ("percent", Format.fixed(s.fraction * 100, 2)),
            ("size", "\(s.virtualSize)"),
            ("elapsed", Format.fixed(elapsed, 3)),
            ("rate", "\(Int64(max(0, rate)))"),
            ("read", "\(s.bytesRead)"),
            ("written", "\(s.bytesWritten)"),
            ("zeroed", "\(s.bytesZeroed)"),
            ("skipped", "\(s.bytesSkipped)"),
            ("depth", "\(s.depth)"),
            ("max_in_flight", "\(s.maxInFlight)"),
            ("final", final ? "true" : "false"),
        ]
        if let c = s.checksum {
            fields.append(("checksum", Format.jsonString(c)))
            fields.append(("checksum_algorithm", Format.jsonString(s.checksumAlgorithm ?? "sha256")))
        }
        if let error { fields.append(("error", Format.jsonString(error))) }
        return "{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}\n"
    }
}
