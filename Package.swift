// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "Ferry",
    platforms: [.macOS(.v15)],
    products: [
        // The embeddable library: the block-device protocol, endpoints, formats and the copy engine.
        .library(name: "Ferry", targets: ["FerryCore", "FerryFile", "FerryNBD", "FerryNFS", "FerryISCSI", "FerryRBD", "FerryFormats", "FerryConvert"]),
        .executable(name: "ferry", targets: ["ferry"]),
        // A TCP proxy that adds latency, for benchmarks of the NFS and iSCSI paths.
        .executable(name: "ferry-delay-proxy", targets: ["ferry-delay-proxy"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // Linux syscall shims and a liburing wrapper whose public header does not include liburing.h
        // (liburing's header clashes with Swift's Glibc module).
        .target(
            name: "CFerryLinux",
            linkerSettings: [.linkedLibrary("uring")]
        ),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CLibDeflate", pkgConfig: "libdeflate", providers: [.apt(["libdeflate-dev"])]),
        // libnbd's declarations only; CFerryNBD defines the functions and loads libnbd on
        // first use (it brings GnuTLS, libxml2 and ICU: most of a cold start's reading).
        .systemLibrary(name: "CLibNBD"),
        .target(name: "CFerryNBD", dependencies: ["CFerryLoad"]),
        // dlopen and dlsym for the loaders above and below.
        .target(name: "CFerryLoad", linkerSettings: [.linkedLibrary("dl")]),
        .systemLibrary(name: "CLibNFS", pkgConfig: "libnfs", providers: [.apt(["libnfs-dev"])]),
        // libiscsi's declarations only; CFerryISCSI loads it on first use (it brings the RDMA
        // stack: libibverbs, librdmacm, libnl).
        .systemLibrary(name: "CLibISCSI", providers: [.apt(["libiscsi-dev"])]),
        .target(name: "CFerryISCSI", dependencies: ["CFerryLoad"]),
        // librbd's and librados's declarations only; CFerryRBD loads them on first use (they
        // bring most of Ceph's client with them).
        .systemLibrary(name: "CLibRBD", providers: [.apt(["librbd-dev"])]),
        .target(name: "CFerryRBD", dependencies: ["CLibRBD", "CFerryLoad"]),
        // OpenSSL's digests (checksums, an OVA's manifest): declarations only; CFerryCrypto
        // loads libcrypto on first use.
        .systemLibrary(name: "CLibCrypto", providers: [.apt(["libssl-dev"])]),
        .target(name: "CFerryCrypto", dependencies: ["CFerryLoad"]),
        .target(name: "FerryCore"),
        .target(name: "FerryFile", dependencies: ["FerryCore", "CFerryLinux"]),
        .target(name: "FerryNBD", dependencies: ["FerryCore", "CLibNBD", "CFerryNBD"]),
        .target(name: "FerryNFS", dependencies: ["FerryCore", "CLibNFS"]),
        .target(name: "FerryISCSI", dependencies: ["FerryCore", "CFerryLinux", "CLibISCSI", "CFerryISCSI"]),
        .target(name: "FerryRBD", dependencies: ["FerryCore", "CLibRBD", "CFerryRBD"]),
        .target(name: "FerryFormats", dependencies: ["FerryCore", "CZlib", "CZstd", "CLibDeflate"]),
        .target(name: "FerryConvert", dependencies: ["FerryCore", "FerryFile", "FerryNBD", "FerryNFS", "FerryISCSI", "FerryRBD", "FerryFormats", "CLibCrypto", "CFerryCrypto"]),
        .executableTarget(
            name: "ferry",
            dependencies: [
                "FerryConvert", "FerryFormats", "FerryCore", "CFerryLinux",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "ferry-delay-proxy", dependencies: ["FerryCore", "CFerryLinux"]),
        // Every format reader under hostile input: the harness, and its libFuzzer target
        // (a replayer when built normally; `make fuzz` builds it with --sanitize=fuzzer).
        .target(name: "FerryFuzz", dependencies: ["FerryFormats", "FerryCore"]),
        .executableTarget(name: "ferry-fuzz", dependencies: ["FerryFuzz"], path: "Fuzz/Entry"),
        // The library's example (Embedding Ferry, in the DocC catalog); the tests run it.
        .executableTarget(name: "ferry-example", dependencies: ["FerryConvert"], path: "Examples/ConvertWithProgress"),
        .testTarget(name: "FerryCoreTests", dependencies: ["FerryCore"]),
        .testTarget(name: "FerryFileTests", dependencies: ["FerryFile", "FerryCore"]),
        .testTarget(name: "FerryNBDTests", dependencies: ["FerryNBD", "FerryConvert", "FerryCore", "FerryTestServers"]),
        // NFS and iSCSI test servers that several test targets start, and the fixtures the network
        // endpoints' tests share (not part of the library).
        .target(name: "FerryTestServers", path: "Tests/FerryTestServers"),
        .testTarget(name: "FerryNFSTests", dependencies: ["FerryNFS", "FerryConvert", "FerryCore", "FerryTestServers"]),
        .testTarget(name: "FerryISCSITests", dependencies: ["FerryISCSI", "FerryCore", "FerryTestServers"]),
        .testTarget(name: "FerryRBDTests", dependencies: ["FerryRBD", "FerryCore"]),
        .testTarget(name: "FerryFormatsTests", dependencies: ["FerryFormats", "FerryConvert", "FerryFile", "FerryCore"]),
        .testTarget(name: "FerryFuzzTests", dependencies: ["FerryFuzz"]),
        .testTarget(name: "FerryConvertTests", dependencies: ["FerryConvert", "FerryFormats", "FerryFile", "FerryCore"]),
        .testTarget(name: "FerryCLITests", dependencies: ["FerryCore", "CFerryLinux", "FerryTestServers"], exclude: ["golden"]),
    ],
    swiftLanguageModes: [.v6]
)
