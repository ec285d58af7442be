# Ferry: build, test, demo and benchmark.
#
#   make demo    install what is missing, build, convert a sample sparse image with progress
#   make test    install what is missing, build, run every test (unit, oracle, CLI)
#   make bench   every bench/*.sh table, against qemu-img, nbdcopy and cp (RUNS=5 by default)
#   make install PREFIX=dir   the binary, its man page and shell completions under dir
#   make fuzz    libFuzzer over every format reader (FUZZ_SECONDS each), corpus kept in Fuzz/
#
# SCRATCH=dir builds in another scratch directory (several people building in one checkout).

SWIFT    ?= swift
SCRATCH  ?=
RUNS     ?= 5
DEMO_DIR ?= /tmp/ferry-demo

SCRATCH_FLAG := $(if $(SCRATCH),--scratch-path $(SCRATCH))
RELEASE_BIN   = $(shell $(SWIFT) build -c release $(SCRATCH_FLAG) --show-bin-path)/ferry

PREFIX   ?= /usr/local

.PHONY: all deps build release test demo bench clean install fuzz hardening

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(SWIFT) build $(SCRATCH_FLAG)

# The Swift runtime linked in: a cold start (nothing in the page cache) then reads 38 MiB
# instead of 51 and takes 0.06-0.07 s instead of 0.10-0.12 s (bench/ times cold starts).
release: deps
	$(SWIFT) build -c release --static-swift-stdlib $(SCRATCH_FLAG)

# No --parallel: XCTest then prints its "Executed N tests" summary, and it is the last line
# (the tests are XCTest; Swift Testing would close with a "0 tests" line of its own).
test: deps
	$(SWIFT) build $(SCRATCH_FLAG)
	$(SWIFT) test --disable-swift-testing $(SCRATCH_FLAG)

# libFuzzer over every format reader, FUZZ_SECONDS (60) each; the corpus and crashes are kept
# under Fuzz/ and replayed by `make test`.
fuzz: deps
	@scripts/fuzz.sh

# Hostile inputs and failing servers, one table (scripts/hardening.sh).
hardening: build
	@FERRY="$$($(SWIFT) build $(SCRATCH_FLAG) --show-bin-path)/ferry" RUNS=$(RUNS) scripts/hardening.sh

# The binary, the man page and bash/zsh/fish completions, generated from the commands.
install: release
	@scripts/install.sh "$(RELEASE_BIN)" "$(PREFIX)"

demo: release
	@scripts/demo.sh "$(RELEASE_BIN)" "$(DEMO_DIR)"

# Every bench/*.sh script, one table each.
bench: release
	@for b in bench/*.sh; do FERRY="$(RELEASE_BIN)" RUNS=$(RUNS) "$$b" || exit 1; done

clean:
	rm -rf .build $(if $(SCRATCH),$(SCRATCH)) "$(DEMO_DIR)"
