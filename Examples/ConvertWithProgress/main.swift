// Converts an image to qcow2 with Ferry's library, printing the progress as it goes.
// Built with the package (`swift build`) and run by the tests:
//
//   ferry-example SOURCE TARGET.qcow2
import FerryConvert
import Foundation

let args = CommandLine.arguments
guard args.count == 3 else {
    print("usage: ferry-example SOURCE TARGET.qcow2")
    exit(2)
}
var options = ConvertOptions()
options.targetFormat = "qcow2"
do {
    let stats = try await convert(sources: [ImageSpec(args[1])], target: ImageSpec(args[2]), options: options) { stats in
        print("\(Int(stats.fraction * 100))%")
    }
    print("done: \(stats.bytesWritten) bytes written, \(stats.bytesSkipped) skipped as holes")
} catch {
    print("failed: \(error)")
    exit(1)
}
