#!/usr/bin/env bash
# Installs a built ferry under PREFIX: the binary, its man page and shell completions, all
# generated from the binary's own command definitions.
#
#   scripts/install.sh path/to/ferry PREFIX
set -euo pipefail
BIN=$1
PREFIX=$2
[ -x "$BIN" ] || { echo "install: no ferry binary at $BIN" >&2; exit 1; }
install -d "$PREFIX/bin" "$PREFIX/share/man/man1" "$PREFIX/share/bash-completion/completions" \
    "$PREFIX/share/zsh/site-functions" "$PREFIX/share/fish/vendor_completions.d"
install -m 0755 "$BIN" "$PREFIX/bin/ferry"
"$BIN" --generate-manual >"$PREFIX/share/man/man1/ferry.1"
"$BIN" --generate-completion-script bash >"$PREFIX/share/bash-completion/completions/ferry"
"$BIN" --generate-completion-script zsh >"$PREFIX/share/zsh/site-functions/_ferry"
"$BIN" --generate-completion-script fish >"$PREFIX/share/fish/vendor_completions.d/ferry.fish"
echo "install: ferry, its man page and bash, zsh and fish completions are in $PREFIX"
