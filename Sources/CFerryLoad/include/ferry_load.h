// What the loaders of CFerryNBD, CFerryRBD, CFerryISCSI and CFerryCrypto share: libraries
// that only some commands need are opened on first use, so that a start of ferry does not
// read them (and their dependencies) from disk.
#pragma once
#include <pthread.h>
#include <stddef.h>

/// Opens `libraries` (NULL-terminated sonames, in order: a later one may need an earlier one)
/// and stores the address of each of the `count` functions named in `names` in `slots`,
/// looking in each library in turn. On failure returns -1 with a one-line reason in `error`,
/// naming `package` as what to install when a library is missing; 0 on success.
int ferry_load_library(const char *const *libraries, const char *package, const char *const *names,
                       void **slots, size_t count, char *error, size_t size);

// The rest of a loader, for a list of functions X(return type, name, (parameters), (arguments)):
//   enum { LIST(FERRY_INDEX) ...special ones as index_NAME... , functionCount };
//   static const char *const names[functionCount] = { LIST(FERRY_NAME) ... };
//   FERRY_LOADER(my_load_error, "package", "libfoo.so.1")
//   LIST(FERRY_FORWARD)
// FERRY_LOADER defines `slots` and `const char *my_load_error(void)`: why the libraries could
// not be loaded, or NULL once they are (loading them on the first call).
#define FERRY_INDEX(ret, name, params, args) index_##name,
#define FERRY_NAME(ret, name, params, args) #name,
#define FERRY_LOADER(error_function, package, ...) \
    static void *slots[functionCount]; \
    static pthread_once_t once = PTHREAD_ONCE_INIT; \
    static char load_error[512]; \
    static void load(void) { \
        static const char *const libraries[] = {__VA_ARGS__, NULL}; \
        ferry_load_library(libraries, package, names, slots, functionCount, load_error, sizeof load_error); \
    } \
    const char *error_function(void) { \
        pthread_once(&once, load); \
        return load_error[0] ? load_error : NULL; \
    }
// Calls the loaded function through its slot.
#define FERRY_CALL(ret, name, params) ((ret (*) params) slots[index_##name])
// A function that is only reached once an entry function loaded the library.
#define FERRY_FORWARD(ret, name, params, args) \
    ret name params { return FERRY_CALL(ret, name, params) args; }
