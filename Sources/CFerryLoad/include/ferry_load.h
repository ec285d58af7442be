// What the loaders of CFerryNBD, CFerryRBD, CFerryISCSI and CFerryCrypto share: libraries
// that only some commands need are opened on first use, so that a start of ferry does not
// read them (and their dependencies) from disk.
#pragma once
#include <stddef.h>

/// Opens `libraries` (NULL-terminated sonames, in order: a later one may need an earlier one)
/// and stores the address of each of the `count` functions named in `names` in `slots`,
/// looking in each library in turn. On failure returns -1 with a one-line reason in `error`,
/// naming `package` as what to install when a library is missing; 0 on success.
int ferry_load_library(const char *const *libraries, const char *package, const char *const *names,
                       void **slots, size_t count, char *error, size_t size);
