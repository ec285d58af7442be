// See include/ferry_load.h.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

#include "ferry_load.h"

enum { maxLibraries = 4 };

int ferry_load_library(const char *const *libraries, const char *package, const char *const *names,
                       void **slots, size_t count, char *error, size_t size) {
    void *handles[maxLibraries];
    size_t opened = 0;
    for (; libraries[opened]; opened++) {
        if (opened == maxLibraries) {
            snprintf(error, size, "too many libraries to load");
            return -1;
        }
        handles[opened] = dlopen(libraries[opened], RTLD_NOW | RTLD_LOCAL);
        if (!handles[opened]) {
            snprintf(error, size, "cannot load %s: %s; install %s", libraries[opened], dlerror(), package);
            return -1;
        }
    }
    for (size_t i = 0; i < count; i++) {
        slots[i] = NULL;
        for (size_t h = 0; h < opened && !slots[i]; h++) slots[i] = dlsym(handles[h], names[i]);
        if (!slots[i]) {
            snprintf(error, size, "%s lacks %s, which ferry needs (too old?)", libraries[opened - 1], names[i]);
            return -1;
        }
    }
    return 0;
}
